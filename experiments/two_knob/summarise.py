"""The two-knob study's table and heatmap from its Optuna study (stepopsd.analysis), labelled with the data.

    python experiments/two_knob/summarise.py --storage sqlite:///outputs/optuna/two_knob_grid-alfworld_heat-cpu.db \
        --study two_knob_grid-alfworld_heat-cpu [--out DIR]

One row per (alpha_clip, lam0) cell: the objective's mean ± standard error over every seed of its trials and n;
the heatmap goes to --out. Prints the machine, the commit and the command first.
"""
from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")

from stepopsd.analysis import cells, data_label, heatmap, provenance, run_frame, save, study_frame  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--out", default=None, help="folder for the heatmap PNG")
    args = ap.parse_args()
    study = study_frame(args.storage, args.study)
    dirs = [d for ds in study.get("job_dirs", []) if isinstance(ds, list) for d in ds if d and os.path.isdir(d)]
    data = f"{data_label(run_frame(dirs[0])['metric'].unique())} games" if dirs else "unknown data"
    print(f"{provenance()}\n\nstudy {args.study}: {len(study)} trials ({study['state'].value_counts().to_dict()}) on {data}\n")
    print("| alpha_clip | lam0 | objective mean | SE | n |\n|---|---|---|---|---|")
    for _, c in cells(study).iterrows():
        print(f"| {c.iloc[0]:.3g} | {c.iloc[1]:.3g} | {c['mean']:.3f} | {c['se']:.3f} | {int(c['n'])} |")
    save(heatmap(study, data).figure, args.out, "heatmap")


if __name__ == "__main__":
    main()
