"""Re-analysis of the StepOPSD-vs-GRPO study from what is committed of it (its runs are gone).

    python experiments/stepopsd_vs_grpo/reanalyse.py [--out DIR] [--readme]

Inputs, all committed text: `legacy/heat_wins.csv` (heat's per-seed wins out of 64, start and end, transcribed
from the README at 4deac3c) and the old summarise.py's outputs `legacy/*.md` (mean ± SE and n per arm, paired
differences as mean ± SE over n seeds). Checks first that the per-seed wins reproduce every heat number of
`legacy/heat_summary.md` (to its printed digits) and stops if one differs. Then, with stepopsd/stats.py: paired
95 % t-intervals, equivalence tests (TOST) within ±0.05, the seeds per arm a 0.05 difference needs from the
observed SD of the paired differences, the looks at 3/5/7/12 heat seeds, and the post-hoc change from the warm
start on heat (exact, per seed) and pick_two (from the aggregates). Writes `<out>/reanalysis.md` and the
figures `<out>/reanalysis_heat.png`, `<out>/reanalysis_pick_two.png` (--out defaults to this folder); --readme
also writes the text into the README's marked block `reanalyse.py` (tests/test_studies.py checks both).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stepopsd import stats  # noqa: E402
from stepopsd.analysis import differences, points, save, write_block  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "experiments/stepopsd_vs_grpo"
ARMS = ("grpo", "stepopsd", "stepopsd budget_clip=null")
PAIRS = (("grpo", "stepopsd"), ("stepopsd", "stepopsd budget_clip=null"), ("grpo", "stepopsd budget_clip=null"))  # b - a
EPISODES = 64  # 16 generated valid_seen games x 4 rollouts per validation
DELTA = EFFECT = 0.05
ALPHA, POWER = 0.05, 0.80
LOOKS = (3, 5, 7, 12)  # the heat seed counts at which results were recorded (commits eef429e, 7d899b8, d219073, db8acae)
VAL, TRAIN_GAMES, ROLLOUTS = "val_generated/valid_seen/success", "val_generated/train/success", "success/rate (training rollouts)"


# --- the committed inputs -------------------------------------------------------------------------------------

def legacy(name: str) -> dict:
    """An old summarise.py output: {"table": {arm: {"n", "start", "end", "gain": (mean, se)}}, "pairs": {(metric, b,
    a): (mean, se, n)}} from its Markdown table and its `b - a over n=.. shared seeds: mean ± se (SE)` lines."""
    text = open(os.path.join(HERE, "legacy", name)).read()
    table, pairs = {}, {}
    for m in re.finditer(r"^\| alfworld_\w+ \| ([^|]+?) \| (\d+) \| ([\d.]+) ± ([\d.]+) \| ([\d.]+) ± ([\d.]+) \| "
                         r"([+-][\d.]+) ± ([\d.]+) \|$", text, re.M):
        v = [float(x) for x in m.groups()[2:]]
        table[m[1]] = {"n": int(m[2]), "start": (v[0], v[1]), "end": (v[2], v[3]), "gain": (v[4], v[5]),
                       "text": [f"{m[3]} ± {m[4]}", f"{m[5]} ± {m[6]}", f"{m[7]} ± {m[8]}"]}
    for m in re.finditer(r"^alfworld_\w+: (.+?) \(generated games\), (.+?) - (.+?) over n=(\d+) shared seeds: "
                         r"([+-][\d.]+) ± ([\d.]+) \(SE\)", text, re.M):
        pairs[m[1], m[2], m[3]] = (float(m[5]), float(m[6]), int(m[4]))
    return {"table": table, "pairs": pairs}


def pair(summary: dict, metric: str, a: str, b: str) -> tuple[float, float, int]:
    """b - a as (mean, SE, n), from whichever orientation the old summary printed."""
    if (metric, b, a) in summary["pairs"]:
        return summary["pairs"][metric, b, a]
    mean, se, n = summary["pairs"][metric, a, b]
    return -mean, se, n


def heat_wins() -> pd.DataFrame:
    return pd.read_csv(os.path.join(HERE, "legacy", "heat_wins.csv"), comment="#").set_index("seed")


def check_heat(wins: pd.DataFrame, old: dict) -> None:
    """The transcribed wins against legacy/heat_summary.md: every printed mean ± SE and paired line."""
    x = wins / EPISODES
    for arm in ARMS:
        got = [x["start"], x[arm], x[arm] - x["start"]]
        printed = [f"{v.mean():.3f} ± {v.std(ddof=1) / math.sqrt(len(v)):.3f}".replace("0.", "0.") for v in got]
        printed[2] = ("+" if got[2].mean() >= 0 else "") + printed[2]
        if printed != old["table"][arm]["text"]:
            raise SystemExit(f"legacy/heat_wins.csv disagrees with legacy/heat_summary.md for {arm}: {printed} "
                             f"vs {old['table'][arm]['text']}")
    for a, b in PAIRS:
        r = stats.paired_test(x[a], x[b])
        mean, se, n = pair(old, VAL, a, b)
        if (f"{r['mean_diff']:+.4f}", f"{r['se']:.4f}", r["n"]) != (f"{mean:+.4f}", f"{se:.4f}", n):
            raise SystemExit(f"legacy/heat_wins.csv disagrees with legacy/heat_summary.md on {b} - {a}")


# --- text ------------------------------------------------------------------------------------------------------

def short(arm: str) -> str:
    return "budget off" if arm == "stepopsd budget_clip=null" else arm


def row(label: str, r: dict, equivalence: bool = True) -> str:
    """A paired result as a table row: seeds, mean ± SE, 95 % CI, t, p, TOST p (lower, upper), SD, seeds needed
    (the last three `-` for a change from the warm start: `equivalence` False)."""
    if not r["se"] > 0:
        return f"| {label} | {r['n']} | {r['mean_diff']:+.4f} (no spread) | n/a | n/a | n/a | n/a | n/a | n/a |"
    if not equivalence:
        return (f"| {label} | {r['n']} | {r['mean_diff']:+.4f} ± {r['se']:.4f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                f"{r['t']:.2f} | {stats.fmt_p(r['p'])} | - | {r['sd']:.4f} | - |")
    t = stats.tost(r["mean_diff"], r["se"], r["n"], DELTA, r.get("df") if r.get("df") != r["n"] - 1 else None)
    need = f"{stats.seeds_for_power(r['sd'], EFFECT, ALPHA, POWER)} ({stats.seeds_for_power(r['sd'], EFFECT, ALPHA, POWER, 'normal')})"
    return (f"| {label} | {r['n']} | {r['mean_diff']:+.4f} ± {r['se']:.4f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
            f"{r['t']:.2f} | {stats.fmt_p(r['p'])} | {stats.fmt_p(t['p'])} ({stats.fmt_p(t['p_lower'])}, "
            f"{stats.fmt_p(t['p_upper'])}) | {r['sd']:.4f} | {need} |")


HEAD = ["| comparison | seeds | difference ± SE | 95 % CI | t | p | TOST ±0.05: p (lower, upper) | SD of the differences | "
        "seeds per arm for 0.05 (normal approx.) |", "|---|---|---|---|---|---|---|---|---|"]


def heat_section(wins: pd.DataFrame, old: dict) -> tuple[list[str], list[dict], pd.DataFrame, dict]:
    x = wins / EPISODES
    lines = ["### heat: validation success, per seed (exact)", "",
             f"From `legacy/heat_wins.csv` (wins out of {EPISODES} per seed: 16 generated valid_seen heat games x 4 "
             f"rollouts at T = 0.4), {len(x)} seeds; the check against `legacy/heat_summary.md` passed (every mean ± SE "
             "of its table and its three paired lines, to their printed digits).", "",
             "| arm | seeds | start (step 0) | end (step 20) | end - start | wins at the end, seeds " +
             f"{x.index.min()}-{x.index.max()} |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        cols = [x["start"], x[arm], x[arm] - x["start"]]
        cells = [f"{c.mean():.3f} ± {c.std(ddof=1) / math.sqrt(len(c)):.3f}" for c in cols]
        cells[2] = ("+" if cols[2].mean() >= 0 else "") + cells[2]
        lines.append(f"| {arm} | {len(x)} | {' | '.join(cells)} | {', '.join(str(int(w)) for w in wins[arm])} |")
    lines += ["", f"Starts (the same in every arm): {', '.join(str(int(w)) for w in wins['start'])}.", "",
              "Paired on seeds, end points (b - a; 12 seeds, the last look):", "", *HEAD]
    results = []
    for a, b in PAIRS:
        r = stats.paired_test(x[a], x[b]) | {"a": short(a), "b": short(b)}
        results.append(r)
        lines.append(row(f"{short(b)} - {short(a)}", r))
    lines += ["", "The looks: the seed count was not fixed in advance. Results were recorded at 3, 5, 7 and 12 seeds "
              "and seeds were added after looking, so the interim p-values are **invalid as tests** (no stopping rule, "
              "no correction for repeated looks), and the 12-seed p-values are nominal. Recomputed from the same "
              "per-seed wins (seeds 0 to n-1), b - a, mean ± SE, p:", "",
              "| seeds | " + " | ".join(f"{short(b)} - {short(a)}" for a, b in PAIRS) + " | status |",
              "|---" * (len(PAIRS) + 2) + "|"]
    for n in LOOKS:
        sub = x.iloc[:n]
        cells = []
        for a, b in PAIRS:
            r = stats.paired_test(sub[a], sub[b])
            cells.append(f"{r['mean_diff']:+.3f} ± {r['se']:.3f}, p = {stats.fmt_p(r['p'])}")
        status = "last look: nominal p" if n == LOOKS[-1] else "interim look: p invalid"
        lines.append(f"| {n} | {' | '.join(cells)} | {status} |")
    rise_per_seed = (x[list(ARMS)].mean(axis=1) - x["start"])
    rise = stats.one_sample(rise_per_seed) | {"a": "warm start", "b": "end (mean of the arms)"}
    se_from_aggregates = stats.se_of_arm_mean([old["table"][a]["gain"][1] for a in ARMS],
                                              [pair(old, VAL, a, b)[1] for a, b in (PAIRS[0], PAIRS[2], PAIRS[1])], len(x))
    lines += ["", "**Post hoc** (not planned before the runs; reported beside pick_two's post-hoc decline): the change "
              "from the warm start, per seed the three arms' mean of end - start:", "", *HEAD,
              row("end - start, mean of the 3 arms (post hoc)", rise, False), "",
              f"(From the rounded aggregates of `legacy/heat_summary.md` alone, `stats.se_of_arm_mean` gives SE "
              f"{se_from_aggregates:.4f} for the same mean: the formula used for pick_two below, checked here against "
              f"the exact per-seed value {rise['se']:.4f}.)", ""]
    summary = pd.DataFrame([{"arm": arm, "step": step, "mean": col.mean(), "se": col.std(ddof=1) / math.sqrt(len(col)),
                             "n": len(col)} for arm in ARMS for step, col in ((0, x["start"]), (20, x[arm]))])
    return lines, results, summary, rise


def rollouts_section(old: dict, task: str, n_label: str) -> tuple[list[str], list[dict]]:
    lines = [f"Training rollouts ({task}: `success/rate`, each run's mean over its 20 steps, T = 1.0, training games; "
             f"from the paired lines of the legacy summary, {n_label}):", "", *HEAD]
    results = []
    for a, b in PAIRS:
        mean, se, n = pair(old, ROLLOUTS, a, b)
        r = stats.paired_summary(mean, se, n) | {"a": short(a), "b": short(b)}
        results.append(r)
        lines.append(row(f"{short(b)} - {short(a)}", r))
    return lines + [""], results


def pick_two_section(train: dict, val: dict) -> tuple[list[str], list[dict], pd.DataFrame, dict]:
    n = train["table"]["grpo"]["n"]
    zero = all(v["start"] == (0.0, 0.0) and v["end"] == (0.0, 0.0) for v in val["table"].values())
    lines = ["### pick_two: from the aggregates (rounded: arms to 3 decimals, paired lines to 4)", "",
             f"Unseen games (`valid_seen`, {EPISODES} episodes): "
             + ("every arm's start and end is 0.000 ± 0.000 over its seeds (every run 0/64): no spread, so no "
                "interval, test or equivalence test is possible." if zero else "see `legacy/pick_two_summary.md`."), "",
             f"Training games (`{TRAIN_GAMES}`: 16 of the training games x 4 rollouts at T = 0.4), {n} seeds, from "
             "`legacy/pick_two_summary_train_games.md`:", "",
             "| arm | seeds | start (step 0) | end (step 20) | end - start |", "|---|---|---|---|---|"]
    for arm in ARMS:
        t = train["table"][arm]
        lines.append(f"| {arm} | {t['n']} | {' | '.join(t['text'])} |")
    lines += ["", "Paired on seeds, end points on the training games (b - a):", "", *HEAD]
    results = []
    for a, b in PAIRS:
        mean, se, m = pair(train, TRAIN_GAMES, a, b)
        r = stats.paired_summary(mean, se, m) | {"a": short(a), "b": short(b)}
        results.append(r)
        lines.append(row(f"{short(b)} - {short(a)}", r))
    gains = [train["table"][a]["gain"] for a in ARMS]
    mean = sum(g[0] for g in gains) / len(gains)
    se = stats.se_of_arm_mean([g[1] for g in gains], [pair(train, TRAIN_GAMES, a, b)[1] for a, b in
                                                     (PAIRS[0], PAIRS[2], PAIRS[1])], n)
    decline = stats.paired_summary(mean, se, n) | {"a": "warm start", "b": "end (mean of the arms)"}
    lines += ["", "**Post hoc** (not planned before the runs; reported beside heat's post-hoc rise): the change from "
              "the warm start on the training games, per seed the three arms' mean of end - start. Its SE comes from "
              "the aggregates (`stats.se_of_arm_mean`: each arm's SE of end - start and the paired SEs of the end "
              "points, which equal those of end - start because every arm's start is the same on a seed):", "",
              *HEAD, row("end - start, mean of the 3 arms (post hoc)", decline, False), ""]
    summary = pd.DataFrame([{"arm": arm, "step": step, "mean": train["table"][arm][k][0], "se": train["table"][arm][k][1],
                             "n": n} for arm in ARMS for step, k in ((0, "start"), (20, "end"))])
    return lines, results, summary, decline


def figure(summary, results, title_metric: str, data: str, what: str):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2), layout="constrained")
    points(summary, "arm", "step", left)
    n = int(summary["n"].max())
    left.set(title=f"{title_metric} ({what})\n({data}; mean ± SE over {n} seeds)", xlabel="training step",
             ylabel=title_metric)
    left.set_xticks(sorted(summary["step"].unique()))
    differences(results, title_metric, data, DELTA, right,
                xlabel="difference in success rate (b - a)")
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="where reanalysis.md and its figures go (default: this folder)")
    ap.add_argument("--readme", action="store_true", help="also write the text into README.md's marked block")
    args = ap.parse_args(argv)
    wins, heat_old = heat_wins(), legacy("heat_summary.md")
    check_heat(wins, heat_old)
    pick_train, pick_val = legacy("pick_two_summary_train_games.md"), legacy("pick_two_summary.md")
    lines = ["## Re-analysis from the committed aggregates", "",
             f"Written by `python {NAME}/reanalyse.py`; every number below is computed by it from committed text "
             "(`legacy/`), none typed by hand. The runs are gone, so this is all that can be recomputed. Definitions: "
             "`stepopsd/stats.py`. Paired differences b - a over seeds with their 95 % t-interval; equivalence (TOST) "
             "within ±0.05 (5 points of success: both one-sided p-values and their maximum, the TOST p; equivalence "
             "is shown at 0.05 when it is below 0.05); seeds per arm for a 0.05 difference at two-sided α = 0.05 and "
             "80 % power from the observed SD of the paired differences (SD = SE·√n), iterating on the t "
             "distribution (the normal approximation in brackets). p-values are nominal: not corrected for the "
             "three comparisons per table.", ""]
    heat_lines, heat_results, heat_summary, rise = heat_section(wins, heat_old)
    roll_lines, heat_roll = rollouts_section(heat_old, "heat", "12 seeds")
    pick_lines, pick_results, pick_summary, decline = pick_two_section(pick_train, pick_val)
    pick_roll_lines, pick_roll = rollouts_section(pick_train, "pick_two", "5 seeds")
    lines += heat_lines + roll_lines + pick_lines + pick_roll_lines
    lines += ["Figures: `reanalysis_heat.png`, `reanalysis_pick_two.png` (measured points only: start and end; y "
              "from 0; paired differences with 95 % t-intervals and the ±0.05 margin).", ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reanalysis.md"), "w") as f:
        f.write(text)
    heat_diffs = [r | {"label": f"{r['b']} - {r['a']}, end points"} for r in heat_results] + \
                 [r | {"label": f"{r['b']} - {r['a']}, training rollouts"} for r in heat_roll] + \
                 [rise | {"label": "end - start, mean of the arms (post hoc)"}]
    save(figure(heat_summary, heat_diffs, VAL, "generated heat games", "validation"), args.out, "reanalysis_heat")
    pick_diffs = [r | {"label": f"{r['b']} - {r['a']}, end points"} for r in pick_results] + \
                 [r | {"label": f"{r['b']} - {r['a']}, training rollouts"} for r in pick_roll] + \
                 [decline | {"label": "end - start, mean of the arms (post hoc)"}]
    save(figure(pick_summary, pick_diffs, TRAIN_GAMES, "generated pick_two games", "validation on training games"),
         args.out, "reanalysis_pick_two")
    plt.close("all")
    if args.readme:
        write_block(os.path.join(HERE, "README.md"), "reanalyse.py", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
