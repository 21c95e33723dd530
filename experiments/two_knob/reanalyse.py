"""Re-analysis of the two-knob grid from what is committed of it (its runs and Optuna database are gone).

    python experiments/two_knob/reanalyse.py [--out DIR] [--readme]

Input, committed text: `legacy/cell_wins.csv` (each cell's wins out of 64 for seeds 0 and 1 and its mean ± SE as
recorded, transcribed from the README at 4deac3c). Checks first that the wins reproduce every recorded mean ± SE
and stops if one differs. Then, with stepopsd/stats.py: the cells (mean ± SE over the 2 seeds), the two-way
analysis of variance, each knob's levels against the default (0.2) with 95 % t-intervals and equivalence tests
(TOST) within ±0.05, the seeds per cell that telling two cells 0.05 apart needs given the observed residual s.d.,
and the heatmap (`<out>/reanalysis_heatmap.png`: a colourbar naming the metric). Writes `<out>/reanalysis.md`
(--out defaults to this folder); --readme also writes it into the README's marked block `reanalyse.py`
(tests/test_studies.py checks both).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from stepopsd import stats  # noqa: E402
from stepopsd.analysis import ALPHA, LAM, heatmap, save, write_block  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "experiments/two_knob"
EPISODES = 64
METRIC = "val_generated/valid_seen/success"
DEFAULT = 0.2  # alpha_clip and lam0 of StepOPSD's defaults
DELTA = EFFECT = 0.05
ALPHA_LEVEL, POWER = 0.05, 0.80


def cell_wins() -> pd.DataFrame:
    return pd.read_csv(os.path.join(HERE, "legacy", "cell_wins.csv"), comment="#")


def fmt(values) -> str:
    s = pd.Series(values, dtype=float)
    return f"{s.mean():.3f} ± {s.std(ddof=1) / math.sqrt(len(s)):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="where reanalysis.md and the heatmap go (default: this folder)")
    ap.add_argument("--readme", action="store_true", help="also write the text into README.md's marked block")
    args = ap.parse_args(argv)
    wins = cell_wins()
    values = {(r.alpha_clip, r.lam0): [r.seed0 / EPISODES, r.seed1 / EPISODES] for r in wins.itertuples()}
    for r in wins.itertuples():
        if fmt(values[r.alpha_clip, r.lam0]) != r.recorded:
            raise SystemExit(f"legacy/cell_wins.csv: cell ({r.alpha_clip}, {r.lam0}): the wins give "
                             f"{fmt(values[r.alpha_clip, r.lam0])}, recorded {r.recorded}")
    a = stats.two_way_anova(values)
    alphas, lams = a["A_levels"], a["B_levels"]
    lines = ["## Re-analysis from the committed per-seed wins", "",
             f"Written by `python {NAME}/reanalyse.py` from `legacy/cell_wins.csv` (wins out of {EPISODES} per cell and "
             "seed, transcribed from this README at 4deac3c); every number below is computed by it, none typed by "
             "hand. The check of the wins against every recorded cell mean ± SE passed. Definitions: "
             "`stepopsd/stats.py`.", "",
             f"Final {METRIC} on generated heat games, mean ± SE over seeds 0 and 1 (wins of seed 0, seed 1):", "",
             "| α_clip \\ λ0 | " + " | ".join(f"{v:g}" for v in lams) + " |", "|---" * (len(lams) + 1) + "|"]
    for x in alphas:
        lines.append(f"| {x:g} | " + " | ".join(
            f"{fmt(values[x, y])} ({round(values[x, y][0] * EPISODES)}, {round(values[x, y][1] * EPISODES)})"
            for y in lams) + " |")
    df_e = a["E"]["df"]
    lines += ["", f"Two-way analysis of variance (`stats.two_way_anova`, the 18 runs as independent replicates, "
              f"{a['r']} per cell; residual s.d. of one run {a['sd_resid']:.4f}, {df_e} df): "
              + "; ".join(f"{name} F({a[k]['df']}, {df_e}) = {a[k]['F']:.2f}, p = {stats.fmt_p(a[k]['p'])}"
                          for k, name in (("A", "α_clip"), ("B", "λ0"), ("AB", "interaction")))
              + ". Marginal means: α_clip " + " / ".join(f"{v:g}" for v in alphas) + " → "
              + " / ".join(f"{v:.3f}" for v in a["A_means"]) + "; λ0 " + " / ".join(f"{v:g}" for v in lams) + " → "
              + " / ".join(f"{v:.3f}" for v in a["B_means"]) + ".", "",
              f"Each knob's levels against the default ({DEFAULT:g}), marginal means over the other knob (6 runs each): "
              f"difference ± SE with SE = √(2·MS_E/6) on the ANOVA's {df_e} df, its 95 % t-interval, and the "
              f"equivalence test (TOST) within ±{DELTA:g} (p-values nominal):", "",
              f"| contrast | difference ± SE | 95 % CI | p | TOST ±{DELTA:g}: p (lower, upper) |", "|---|---|---|---|---|"]
    se = math.sqrt(2 * a["E"]["ms"] / (len(lams) * a["r"]))
    for name, levels, means in (("α_clip", alphas, a["A_means"]), ("λ0", lams, a["B_means"])):
        ref = means[levels.index(DEFAULT)]
        for level, mean in zip(levels, means):
            if level == DEFAULT:
                continue
            r = stats.paired_summary(mean - ref, se, 2, df=df_e)
            t = stats.tost(mean - ref, se, 2, DELTA, df=df_e)
            lines.append(f"| {name} {level:g} - {DEFAULT:g} | {r['mean_diff']:+.4f} ± {se:.4f} | "
                         f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {stats.fmt_p(r['p'])} | {stats.fmt_p(t['p'])} "
                         f"({stats.fmt_p(t['p_lower'])}, {stats.fmt_p(t['p_upper'])}) |")
    sd_two_cells = a["sd_resid"] * math.sqrt(2)
    lines += ["", f"Power: two cells' values on one seed differ with s.d. ≈ √2 x the residual s.d. = {sd_two_cells:.4f} "
              "(treating the cells as independent; pairing them by seed lowers it when a seed's values are positively "
              "correlated across cells). Telling two cells "
              f"{EFFECT:g} apart (two-sided α = {ALPHA_LEVEL:g}, 80 % power) then needs "
              f"{stats.seeds_for_power(sd_two_cells, EFFECT, ALPHA_LEVEL, POWER)} seeds per cell, iterating on the t "
              f"distribution with n - 1 df (conservative for two independent cells; {stats.seeds_for_power(sd_two_cells, EFFECT, ALPHA_LEVEL, POWER, 'normal')} by the normal "
              "approximation); the grid has 2.", "",
              "Figure: `reanalysis_heatmap.png` (the cells above; the colourbar names the metric).", ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reanalysis.md"), "w") as f:
        f.write(text)
    study = pd.DataFrame([{"number": i, "state": "COMPLETE", "value": sum(v) / len(v), ALPHA: x, LAM: y,
                           "seeds": [0, 1], "seed_values": v} for i, ((x, y), v) in enumerate(values.items())])
    save(heatmap(study, "generated heat games; legacy/cell_wins.csv",
                 metric=f"final {METRIC}").figure, args.out, "reanalysis_heatmap")
    plt.close("all")
    if args.readme:
        write_block(os.path.join(HERE, "README.md"), "reanalyse.py", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
