"""The StepOPSD-vs-GRPO study's table and plots from its runs (stepopsd.analysis), labelled with the data.

    python experiments/stepopsd_vs_grpo/summarise.py 'outputs/alfworld_heat/multiruns/*/*' [--out DIR]

Per experiment and arm: validation at the start (step 0) and at the end, mean ± standard error over seeds, and
paired comparisons on shared seeds (StepOPSD - GRPO; StepOPSD - StepOPSD with the budget off); then the same for
the training rollouts' success (`success/rate`, each run's mean over its steps: the episodes RL trained on, at the
rollout temperature, on training games). Prints a
Markdown table headed by the machine, the commit and the command; writes learning curves to --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")

from stepopsd.analysis import (curves, data_title, find_runs, final, paired, paired_text, provenance, run_mean, runs_frame,  # noqa: E402
                               save, summarise, validation_metrics)


PAIRS = (("grpo", "stepopsd"), ("stepopsd budget_clip=null", "stepopsd"), ("grpo", "stepopsd budget_clip=null"))  # (a, b): b - a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help=f"run directories or globs, {os.pathsep!r}-separated")
    ap.add_argument("--metric", default=None, help="validation metric (default: the first split's overall one)")
    ap.add_argument("--training", default="success/rate", help="training-rollout metric averaged over each run's steps")
    ap.add_argument("--out", default=None, help="folder for the PNG plots")
    args = ap.parse_args()
    df = runs_frame(find_runs(args.runs))
    metric = args.metric or validation_metrics(df)[0]
    print(f"{provenance()}\n\nmetric: {metric} on {data_title(df)}\n")
    print("| experiment | arm | seeds | start (step 0) | end | end - start |\n|---|---|---|---|---|---|")
    for experiment, sub in df.groupby("experiment"):
        rows = sub[sub["metric"] == metric]
        start = summarise(rows[rows["step"] == 0], by="arm").set_index("arm")
        end = final(sub, metric)
        gain = end.merge(rows[rows["step"] == 0][["run_dir", "value"]], on="run_dir", suffixes=("", "_start"))
        gain["value"] = gain["value"] - gain["value_start"]
        for (arm, e), (_, g) in zip(summarise(end, by="arm").set_index("arm").iterrows(),
                                    summarise(gain, by="arm").set_index("arm").iterrows()):
            s = start.loc[arm]
            print(f"| {experiment} | {arm} | {int(e['n'])} | {s['mean']:.3f} ± {s['se']:.3f} | {e['mean']:.3f} ± {e['se']:.3f} "
                  f"| {g['mean']:+.3f} ± {g['se']:.3f} |")
        arms = set(end["arm"])
        for a, b in PAIRS:
            if {a, b} <= arms:
                print(f"\n{experiment}: {paired_text(paired(end, a, b), metric, data_title(sub))}")
        if (sub["metric"] == args.training).any():
            per_run = run_mean(sub, args.training)
            print(f"\n{experiment}: {args.training} of the training rollouts, each run's mean over its "
                  f"{int(per_run['steps'].median())} steps, mean ± SE over seeds: " + "; ".join(
                      f"{arm} {r['mean']:.3f} ± {r['se']:.3f} (n={int(r['n'])})"
                      for arm, r in summarise(per_run, by="arm").set_index("arm").iterrows()))
            for a, b in PAIRS:
                if {a, b} <= set(per_run["arm"]):
                    print(f"\n{experiment}: {paired_text(paired(per_run, a, b), args.training + ' (training rollouts)', data_title(sub))}")
        ax = curves(sub, metric)
        save(ax.figure, args.out, f"curves_{experiment}")
        print()


if __name__ == "__main__":
    main()
