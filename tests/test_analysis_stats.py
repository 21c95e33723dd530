"""stepopsd.stats with numbers worked out by hand. Student's t with 2 degrees of freedom has closed forms, used
throughout: CDF F_2(t) = 1/2 + t/(2·sqrt(t² + 2)) and quantile t_{q,2} = (2q - 1)/sqrt(2q(1 - q)); with 4, the
two-sided tail P(|T_4| > t) = 1 - (3/4)·x·(1 - x²/12), x = t/sqrt(1 + t²/4). Other quantiles are the printed
values of a t table (3 decimals)."""
import math

import pandas as pd
import pytest

from stepopsd import stats

A, B = [0.1, 0.2, 0.3], [0.2, 0.4, 0.6]  # per-seed values of two arms on seeds 0, 1, 2: d = 0.1, 0.2, 0.3
SE = 0.1 / math.sqrt(3)  # d: mean 0.2, SD 0.1 (deviations -0.1, 0, 0.1: 0.02 / 2 = 0.01), SE = 0.1/sqrt(3) = 0.057735


def same(x: dict, y: dict) -> bool:
    """Two results equal to float rounding, key by key (an interval is a pair)."""
    flat = lambda d: {(k, i): v for k, val in d.items() for i, v in enumerate(val if isinstance(val, tuple) else (val,))}  # noqa: E731
    return flat(x) == pytest.approx(flat(y))


def test_per_seed_averages_the_runs_of_one_arm_and_seed_into_one_value():
    runs = pd.DataFrame({"arm": ["grpo", "grpo", "grpo", "stepopsd"], "seed": [0, 0, 1, 0],
                         "value": [0.1, 0.3, 0.5, 0.25], "run_dir": ["a", "b", "c", "d"]})
    out = stats.per_seed(runs, "arm")
    # grpo seed 0: (0.1 + 0.3)/2 = 0.2 from 2 runs; grpo seed 1: 0.5; stepopsd seed 0: 0.25
    assert out[["arm", "seed", "value", "runs"]].values.tolist() == [["grpo", 0, pytest.approx(0.2), 2],
                                                                      ["grpo", 1, 0.5, 1], ["stepopsd", 0, 0.25, 1]]
    with pytest.raises(ValueError, match="no rows"):
        stats.per_seed(runs.iloc[:0], "arm")


def test_paired_test_and_its_t_interval_on_three_seeds():
    res = stats.paired_test(A, B)
    t = 0.2 / SE  # 3.464102
    p = 1 - t / math.sqrt(t ** 2 + 2)  # 2·(1 - F_2(t)) = 1 - 3.464102/3.741657 = 0.074180
    q = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975,2} = 4.302653
    assert (res["n"], res["df"]) == (3, 2)
    assert [res["mean_diff"], res["se"], res["sd"], res["t"], res["p"]] == pytest.approx([0.2, SE, 0.1, t, p])
    assert (t, p, q) == pytest.approx((3.464102, 0.074180, 4.302653), abs=1e-6)
    assert res["ci"] == pytest.approx((0.2 - q * SE, 0.2 + q * SE))  # 0.2 ± 0.248414
    assert res["ci"] == pytest.approx((-0.048414, 0.448414), abs=1e-6)
    assert stats.t_interval(0.2, SE, 3, level=0.90) == pytest.approx((0.2 - 0.9 / math.sqrt(0.095) * SE,
                                                                      0.2 + 0.9 / math.sqrt(0.095) * SE))
    # the same from the summary statistics (mean difference, SE, n), and as a one-sample test of the differences
    assert same(stats.paired_summary(0.2, SE, 3), res)
    assert same(stats.one_sample([0.1, 0.2, 0.3]), res)
    flat = stats.paired_test([0.25, 0.5], [0.5, 0.75])  # every difference 0.25: no spread, no test, no interval
    assert flat["mean_diff"] == 0.25 and math.isnan(flat["p"]) and math.isnan(flat["ci"][0])
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_test([0.1, 0.2], [0.1])


def test_tost_gives_both_one_sided_p_values_and_their_maximum():
    # margin 0.5: t- = (0.2 + 0.5)/SE = 12.124356 (t² = 0.49·300 = 147), p_lower = 1 - F_2(t-) = 1/2 - t/(2·sqrt(149))
    #             t+ = (0.2 - 0.5)/SE = -5.196152 (t² = 0.09·300 = 27), p_upper = F_2(t+) = 1/2 - sqrt(27)/(2·sqrt(29))
    p_lower = 0.5 - math.sqrt(147) / (2 * math.sqrt(149))  # 0.5 - 0.496633 = 0.003367
    p_upper = 0.5 - math.sqrt(27) / (2 * math.sqrt(29))  # 0.5 - 0.482451 = 0.017549
    assert (p_lower, p_upper) == pytest.approx((0.003367, 0.017549), abs=1e-6)
    res = stats.tost_paired(A, B, 0.5)
    assert [res["t_lower"], res["t_upper"]] == pytest.approx([math.sqrt(147), -math.sqrt(27)])
    assert [res["p_lower"], res["p_upper"], res["p"]] == pytest.approx([p_lower, p_upper, p_upper])
    assert stats.tost(0.2, SE, 3, 0.5) == pytest.approx(res)
    # p < 0.05 <=> the 90 % interval, 0.2 ± t_{0.95,2}·SE = 0.2 ± 2.919986·0.057735 = [0.0314, 0.3686], lies
    # inside (-0.5, 0.5); with margin 0.3 it does not: p_upper = F_2(-sqrt(3)) = 1/2 - sqrt(3)/(2·sqrt(5)) = 0.1127
    narrow = stats.tost(0.2, SE, 3, 0.3)
    assert narrow["p"] == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5))) and narrow["p"] > 0.05
    assert math.isnan(stats.tost(0.1, 0.0, 3, 0.5)["p"])
    with pytest.raises(ValueError, match="margin"):
        stats.tost(0.2, SE, 3, 0)


def test_seeds_for_power_normal_approximation_and_t_iteration():
    # SD of the differences = effect: normal n = (z_0.975 + z_0.8)² = (1.960 + 0.842)² = 7.851 -> 8
    assert stats.seeds_for_power(1.0, 1.0, method="normal") == 8
    # on t (table): n = 9: (t_0.975,8 + t_0.8,8)² = (2.306 + 0.889)² = 10.21 > 9, fails;
    #               n = 10: (t_0.975,9 + t_0.8,9)² = (2.262 + 0.883)² = 9.89 <= 10, holds
    assert stats.seeds_for_power(1.0, 1.0) == 10
    # SD 0.1 for a 0.05 effect (ratio² = 4): normal 7.849·4 = 31.4 -> 32; t: n = 33: (2.037 + 0.853)²·4 = 33.41 > 33,
    # n = 34: (2.035 + 0.853)²·4 = 33.36 <= 34
    assert stats.seeds_for_power(0.1, 0.05, method="normal") == 32
    assert stats.seeds_for_power(0.1, -0.05) == 34  # the sign of the effect does not matter
    with pytest.raises(ValueError, match="sd_diff"):
        stats.seeds_for_power(0.0, 0.05)
    with pytest.raises(ValueError, match="method"):
        stats.seeds_for_power(0.1, 0.05, method="exact")


def test_se_of_the_per_seed_mean_of_arms_from_summary_statistics():
    # arms x1 = 1, 2, 3 and x2 = 2, 2, 5 on 3 seeds: per-seed means 1.5, 2, 4 (mean 2.5, deviations -1, -0.5, 1.5:
    # variance 3.5/2 = 1.75). Summaries: var(x1) = 1, var(x2) = 6/2 = 3, var(x2 - x1) = var(1, 0, 2) = 1
    two = stats.se_of_arm_mean([math.sqrt(1 / 3), math.sqrt(3 / 3)], [math.sqrt(1 / 3)], 3)
    assert two == pytest.approx(math.sqrt(1.75 / 3))  # (2·(1 + 3) - 1)/4 = 1.75
    # a third arm x3 = 3, 0, 3 (var 3): per-seed means 2, 4/3, 11/3 (variance (1/9 + 1 + 16/9)/2 = 13/9);
    # var(x3 - x1) = var(2, -2, 0) = 4, var(x3 - x2) = var(1, -2, -2) = 3: (3·(1 + 3 + 3) - (1 + 4 + 3))/9 = 13/9
    three = stats.se_of_arm_mean([math.sqrt(1 / 3), 1, 1], {(0, 1): math.sqrt(1 / 3), (0, 2): math.sqrt(4 / 3),
                                                            (1, 2): 1}, 3)
    assert three == pytest.approx(math.sqrt(13 / 9 / 3))
    with pytest.raises(ValueError, match="every pair"):
        stats.se_of_arm_mean([1, 1, 1], [1], 3)


def test_two_way_anova_on_a_balanced_two_by_two_grid():
    cells = {("a1", "b1"): [1, 3], ("a1", "b2"): [2, 4], ("a2", "b1"): [5, 7], ("a2", "b2"): [8, 8]}
    res = stats.two_way_anova(cells)
    # grand mean 38/8 = 4.75; cell means 2, 3, 6, 8; A means 2.5, 7; B means 4, 5.5
    # SS_A = 2·2·(2.25² + 2.25²) = 40.5; SS_B = 2·2·(0.75² + 0.75²) = 4.5;
    # SS_cells = 2·(2.75² + 1.75² + 1.25² + 3.25²) = 45.5, SS_AB = 45.5 - 40.5 - 4.5 = 0.5; SS_E = 2 + 2 + 2 + 0 = 6
    assert [res["A"]["ss"], res["B"]["ss"], res["AB"]["ss"], res["E"]["ss"]] == pytest.approx([40.5, 4.5, 0.5, 6])
    assert (res["A"]["df"], res["B"]["df"], res["AB"]["df"], res["E"]["df"]) == (1, 1, 1, 4)
    # MS_E = 6/4 = 1.5: F_A = 27, F_B = 3, F_AB = 1/3; F(1, 4) = T_4², p = 1 - (3/4)·x·(1 - x²/12), x = t/sqrt(1 + t²/4)
    assert [res["A"]["F"], res["B"]["F"], res["AB"]["F"]] == pytest.approx([27, 3, 1 / 3])

    def p4(f):
        x = math.sqrt(f) / math.sqrt(1 + f / 4)
        return 1 - 0.75 * x * (1 - x ** 2 / 12)

    assert [res["A"]["p"], res["B"]["p"], res["AB"]["p"]] == pytest.approx([p4(27), p4(3), p4(1 / 3)])
    assert p4(3) == pytest.approx(0.158302, abs=1e-6)  # x = 1.309307, 1 - 0.75·1.309307·0.857143
    assert res["sd_resid"] == pytest.approx(math.sqrt(1.5)) and res["A_means"] == [2.5, 7] and res["B_means"] == [4, 5.5]
    with pytest.raises(ValueError, match="full grid"):
        stats.two_way_anova({("a1", "b1"): [1, 2], ("a1", "b2"): [1, 2], ("a2", "b1"): [1, 2]})


def test_p_values_are_written_without_ever_reading_zero():
    assert [stats.fmt_p(0.0742), stats.fmt_p(1.8e-4), stats.fmt_p(float("nan"))] == ["0.074", "1.8e-04", "n/a"]
