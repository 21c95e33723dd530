"""Statistics for comparisons over seeds. The unit of analysis is the seed: a seed fixes an arm's warm start, task
order and validation sampling, so several runs (or evaluations) of one arm and seed are averaged into one value
(`per_seed`) before any test, and two arms are compared on the differences of their values on shared seeds.

Every test has two forms: from the values (`paired_test`, `one_sample`) and from summary statistics (mean,
standard error, n: `paired_summary`, `tost`, `se_of_arm_mean`), so that aggregates recorded without their runs
can be re-analysed. Notation: d_s is the per-seed difference (arm b minus arm a) on seed s = 1..n; d̄ its mean;
SD its sample standard deviation (n - 1 in the denominator); SE = SD/√n; F_ν the CDF of Student's t with ν
degrees of freedom (ν = n - 1 unless a test says otherwise) and t_{q,ν} its q-quantile; z_q the normal one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st


def per_seed(df: pd.DataFrame, by=("arm",), on: str = "seed", value: str = "value") -> pd.DataFrame:
    """One value per (`by`..., seed): the mean of `value` over the rows (runs or evaluations) of that group and
    seed, with `runs`, how many rows were averaged. Pass one row per run (e.g. each run's final validation); the
    result is what every test here takes, so that repeated runs of one seed never count as independent seeds."""
    keys = [by] if isinstance(by, str) else list(by)
    if df.empty:
        raise ValueError("per_seed: no rows")
    g = df.groupby([*keys, on], dropna=False, sort=True)[value]
    return pd.DataFrame({value: g.mean(), "runs": g.count()}).reset_index()


def t_interval(mean: float, se: float, n: int, level: float = 0.95, df: float | None = None) -> tuple[float, float]:
    """The t-interval mean ± t_{(1+level)/2, ν}·SE with ν = n - 1 (or `df`); (nan, nan) when SE is 0 or nan or
    ν < 1 (no spread, no interval)."""
    nu = n - 1 if df is None else df
    if not (nu >= 1 and se > 0):
        return float("nan"), float("nan")
    half = float(_st.t.ppf((1 + level) / 2, nu)) * se
    return mean - half, mean + half


def paired_summary(mean_diff: float, se: float, n: int, level: float = 0.95, df: float | None = None) -> dict:
    """The paired t-test from summary statistics of the differences: SD = SE·√n, t = d̄/SE, two-sided
    p = 2·(1 - F_ν(|t|)), ν = n - 1 (or `df`), and the `level` t-interval d̄ ± t_{(1+level)/2, ν}·SE.
    t, p and the interval are nan when SE is 0 (every difference equal) or n < 2."""
    nu = n - 1 if df is None else df
    ok = nu >= 1 and se > 0
    t = mean_diff / se if ok else float("nan")
    p = float(2 * _st.t.sf(abs(t), nu)) if ok else float("nan")
    return {"n": int(n), "df": nu, "mean_diff": float(mean_diff), "se": float(se), "sd": float(se * math.sqrt(n)),
            "t": float(t), "p": p, "level": level, "ci": t_interval(mean_diff, se, n, level, df)}


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired: two equal-length 1-D sequences of per-seed values, got shapes {a.shape} and {b.shape}")
    return b - a


def _mean_se(d: np.ndarray) -> tuple[float, float]:
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def paired_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Paired t-test of b - a over seeds (a[i], b[i]: the two arms' values on the same seed): d = b - a,
    d̄, SE = SD(d)/√n, then `paired_summary(d̄, SE, n, level)`."""
    mean, se = _mean_se(_diffs(a, b))
    return paired_summary(mean, se, len(a), level)


def one_sample(values: Sequence[float], level: float = 0.95) -> dict:
    """One-sample t-test of mean 0 over seeds (e.g. each seed's change from its warm start): `paired_test`
    against zeros: x̄, SE = SD(x)/√n, t = x̄/SE, ν = n - 1."""
    values = np.asarray(values, float)
    return paired_test(np.zeros_like(values), values, level)


def tost(mean_diff: float, se: float, n: int, delta: float, df: float | None = None) -> dict:
    """Paired equivalence test for a margin ±δ, two one-sided t-tests (Schuirmann 1987), from summary
    statistics: H0⁻: μ_d ≤ -δ with t⁻ = (d̄ + δ)/SE and p_lower = 1 - F_ν(t⁻); H0⁺: μ_d ≥ +δ with
    t⁺ = (d̄ - δ)/SE and p_upper = F_ν(t⁺); ν = n - 1 (or `df`). p_tost = max(p_lower, p_upper): equivalence
    within ±δ is shown at level α when p_tost < α, i.e. when the (1 - 2α) t-interval lies inside (-δ, δ).
    All nan when SE is 0 or n < 2."""
    if delta <= 0:
        raise ValueError(f"tost: the margin delta must be > 0, got {delta}")
    nu = n - 1 if df is None else df
    if not (nu >= 1 and se > 0):
        nan = float("nan")
        return {"delta": delta, "t_lower": nan, "t_upper": nan, "p_lower": nan, "p_upper": nan, "p": nan}
    t_lo, t_up = (mean_diff + delta) / se, (mean_diff - delta) / se
    p_lo, p_up = float(_st.t.sf(t_lo, nu)), float(_st.t.cdf(t_up, nu))
    return {"delta": delta, "t_lower": t_lo, "t_upper": t_up, "p_lower": p_lo, "p_upper": p_up, "p": max(p_lo, p_up)}


def tost_paired(a: Sequence[float], b: Sequence[float], delta: float) -> dict:
    """`tost` on the per-seed differences b - a (d̄ and SE = SD(d)/√n from the values)."""
    d = _diffs(a, b)
    mean, se = _mean_se(d)
    return tost(mean, se, len(d), delta)


def seeds_for_power(sd_diff: float, effect: float, alpha: float = 0.05, power: float = 0.80, method: str = "t",
                    max_n: int = 100_000) -> int:
    """Seeds per arm (= pairs) for a two-sided paired t-test at level α to detect a true mean difference `effect`
    with probability `power`, given the standard deviation of the per-seed differences `sd_diff` (observed:
    SD = SE·√n of a paired comparison).
    method "normal": n = ⌈((z_{1-α/2} + z_{power})·SD/effect)²⌉ (the normal approximation; too small at few seeds);
    method "t" (default): the smallest n ≥ 2 with n ≥ ((t_{1-α/2, n-1} + t_{power, n-1})·SD/effect)², found by
    iterating n upward on Student's t (the t quantiles grow as n falls, so this is larger than "normal")."""
    if sd_diff <= 0 or effect == 0:
        raise ValueError(f"seeds_for_power: sd_diff must be > 0 and effect non-zero, got {sd_diff}, {effect}")
    ratio = (sd_diff / abs(effect)) ** 2
    if method == "normal":
        return max(2, math.ceil((_st.norm.ppf(1 - alpha / 2) + _st.norm.ppf(power)) ** 2 * ratio))
    if method != "t":
        raise ValueError(f"seeds_for_power: method is 't' or 'normal', got {method!r}")
    for n in range(2, max_n + 1):
        if n >= (_st.t.ppf(1 - alpha / 2, n - 1) + _st.t.ppf(power, n - 1)) ** 2 * ratio:
            return n
    raise ValueError(f"seeds_for_power: more than {max_n} seeds")


def se_of_arm_mean(se_arms: Sequence[float], se_pairs: Mapping[tuple[int, int], float] | Sequence[float], n: int) -> float:
    """Standard error over seeds of the per-seed mean of k arms, m_s = (1/k)·Σ_i x_is, from summary statistics:
    each arm's SE_i and every pair's paired-difference SE_ij on the same n seeds. With v_i = n·SE_i² (the sample
    variance of arm i) and v_ij = n·SE_ij² (that of x_i - x_j), the sample covariances are
    c_ij = (v_i + v_j - v_ij)/2, so var(m) = (1/k²)·(Σ_i v_i + Σ_{i≠j} c_ij) = (1/k²)·(k·Σ_i v_i - Σ_{i<j} v_ij)
    and SE(m) = √(var(m)/n). `se_pairs`: {(i, j): SE_ij} for i < j, or a sequence in the order (0,1), (0,2), ...,
    (1,2), .... Exact for unrounded inputs; rounded inputs give an approximation."""
    k = len(se_arms)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    se_pairs = dict(se_pairs) if isinstance(se_pairs, Mapping) else dict(zip(pairs, se_pairs))
    if sorted(se_pairs) != pairs:
        raise ValueError(f"se_of_arm_mean: need the paired SE of every pair {pairs}, got {sorted(se_pairs)}")
    v = [n * s ** 2 for s in se_arms]
    var = (k * sum(v) - sum(n * se_pairs[p] ** 2 for p in pairs)) / k ** 2
    if var < 0:
        raise ValueError("se_of_arm_mean: the SEs given are inconsistent (negative variance)")
    return math.sqrt(var / n)


def two_way_anova(cells: Mapping[tuple, Sequence[float]]) -> dict:
    """Two-way analysis of variance with interaction on a balanced grid: `cells[(a, b)]` holds r values for every
    level a of factor A and b of factor B. With the grand mean G, the cell means m_ab, and the level means m_a, m_b:
    SS_A = B·r·Σ_a (m_a - G)², SS_B = A·r·Σ_b (m_b - G)², SS_AB = r·Σ_ab (m_ab - G)² - SS_A - SS_B,
    SS_E = Σ (x - m_ab)²; df (A-1), (B-1), (A-1)(B-1), A·B·(r-1); F = MS/MS_E with MS = SS/df, p from
    F's upper tail. Returns {"A", "B", "AB": {ss, df, F, p}, "E": {ss, df, ms}, "sd_resid": √MS_E, "r"}."""
    a_levels = sorted({k[0] for k in cells})
    b_levels = sorted({k[1] for k in cells})
    r = {len(v) for v in cells.values()}
    if len(r) != 1 or set(cells) != {(a, b) for a in a_levels for b in b_levels} or min(r) < 2:
        raise ValueError("two_way_anova: a full grid with the same number (>= 2) of values in every cell")
    r = r.pop()
    x = np.array([[cells[a, b] for b in b_levels] for a in a_levels], float)  # A x B x r
    g, m = x.mean(), x.mean(axis=2)
    ss_a = len(b_levels) * r * ((m.mean(axis=1) - g) ** 2).sum()
    ss_b = len(a_levels) * r * ((m.mean(axis=0) - g) ** 2).sum()
    ss_ab = r * ((m - g) ** 2).sum() - ss_a - ss_b
    ss_e = ((x - m[..., None]) ** 2).sum()
    df_a, df_b = len(a_levels) - 1, len(b_levels) - 1
    df_e = len(a_levels) * len(b_levels) * (r - 1)
    ms_e = ss_e / df_e

    def row(ss, df):
        f = (ss / df) / ms_e if ms_e > 0 else float("nan")
        return {"ss": float(ss), "df": df, "F": float(f), "p": float(_st.f.sf(f, df, df_e))}

    return {"A": row(ss_a, df_a), "B": row(ss_b, df_b), "AB": row(ss_ab, df_a * df_b),
            "E": {"ss": float(ss_e), "df": df_e, "ms": float(ms_e)}, "sd_resid": math.sqrt(ms_e), "r": r,
            "A_levels": a_levels, "B_levels": b_levels,
            "A_means": m.mean(axis=1).tolist(), "B_means": m.mean(axis=0).tolist()}


def fmt_p(p: float) -> str:
    """A p-value for a record: 3 decimals, or scientific notation below 0.001 (never `0.000`); `n/a` for nan."""
    if p != p:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
