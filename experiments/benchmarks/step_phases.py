"""Per-phase medians of training runs from their logged metrics (`<run dir>/csv/version_0/metrics.csv`).

For each group of run folders: the median over all their training steps of the rollout, generation and
environment time, the teacher's rescoring and the PPO update, the step (rollout + rescoring + update),
the environment's share of the rollout, and, with two groups, the ratios of the first group to the
second. Usage (two groups, e.g. new code vs a baseline checkout, each run with `hydra.run.dir=DIR`):
    python experiments/benchmarks/step_phases.py --runs /tmp/ab/new/* --vs /tmp/ab/base/*
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics

PHASES = ("time/rollout_s", "time/generate_s", "time/env_s", "time/rescore_s", "time/update_s")


def step_rows(run: str) -> list[dict[str, float]]:
    """One dict per training step: the phase times logged for it (the rows of one step are merged)."""
    (path,) = glob.glob(os.path.join(run, "csv", "version_*", "metrics.csv"))
    steps: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {k: float(row[k]) for k in PHASES if row.get(k)}
            if values:
                steps.setdefault(row["step"], {}).update(values)
    out = []
    for values in steps.values():
        if all(k in values for k in PHASES):
            values["step_s"] = values["time/rollout_s"] + values["time/rescore_s"] + values["time/update_s"]
            values["env_share"] = values["time/env_s"] / values["time/rollout_s"]
            out.append(values)
    return out


def medians(runs: list[str]) -> dict[str, float]:
    rows = [r for run in runs for r in step_rows(run)]
    if not rows:
        raise SystemExit(f"no training steps with all of {', '.join(PHASES)} in {runs}")
    return {"steps": len(rows)} | {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run folders (each holding csv/version_0/metrics.csv)")
    p.add_argument("--vs", nargs="*", default=[], help="run folders of the baseline")
    a = p.parse_args()
    groups = [("runs", medians(a.runs))] + ([("vs", medians(a.vs))] if a.vs else [])
    keys = [k for k in groups[0][1] if k != "steps"]
    print("| group | steps | " + " | ".join(k.removeprefix("time/") for k in keys) + " |")
    print("| --- " * (len(keys) + 2) + "|")
    for name, m in groups:
        print(f"| {name} | {m['steps']} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |")
    if a.vs:
        new, old = groups[0][1], groups[1][1]
        print("| ratio runs/vs | | " + " | ".join(f"{new[k] / old[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
