"""The two-knob study's table and heatmap, regenerated from its committed study export and runs only.

    python experiments/two_knob/summarise.py [--study DIR] [--out DIR] [--readme]

Reads `<study>/runs/<setting>/study.json` (the Optuna study, exported by `experiments/collect.py --storage ...`)
and the runs beside it (`runs/<setting>/<arm>/seed<k>/`), nothing under outputs/; writes, per setting,
`<out>/<setting>/summary.md` and `<out>/<setting>/heatmap.png`. --study defaults to this folder, --out to
--study; --readme also writes each summary into the study README's marked block `summarise.py <setting>`
(tests/test_studies.py checks that README, summaries and runs agree).

One row per (alpha_clip, lam0) cell: the objective's mean ± standard error over seeds and n (several trials of a
cell on one seed are averaged into one value per seed); each trial's per-seed values checked against its
committed runs' final metric; on a full grid with the same number (>= 2) of seeds in every cell, a two-way
analysis of variance (stepopsd.stats.two_way_anova).
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from stepopsd import stats  # noqa: E402
from stepopsd.analysis import (ALPHA, LAM, cell_seeds, cells, data_title, final, heatmap, resolved_config, runs_frame,  # noqa: E402
                               save, study_frame, validation_metrics, write_block)

STUDY = os.path.dirname(os.path.abspath(__file__))
NAME = "experiments/two_knob"


def objective(runs) -> str:
    """The metric the sweep optimised: the runs' `optimized_metric`, else their first overall validation metric."""
    named = {resolved_config(d).get("optimized_metric") for d in runs["run_dir"].unique()} - {None}
    return named.pop() if len(named) == 1 else validation_metrics(runs)[0]


def anova_lines(c, metric: str) -> list[str]:
    grid = {(r[ALPHA], r[LAM]): r["values"] for _, r in c.iterrows()}
    try:
        a = stats.two_way_anova(grid)
    except ValueError as e:
        return [f"No two-way analysis of variance: {e}.", ""]
    if not a["E"]["ms"] > 0:
        return ["No two-way analysis of variance: the seeds of every cell have equal values (no residual variance).", ""]
    return [f"Two-way analysis of variance of {metric} over seeds ({a['r']} per cell; residual s.d. of one run "
            f"{a['sd_resid']:.4f}, {a['E']['df']} df): "
            + "; ".join(f"{name} F({a[k]['df']}, {a['E']['df']}) = {a[k]['F']:.2f}, p = {stats.fmt_p(a[k]['p'])}"
                        for k, name in (("A", "alpha_clip"), ("B", "lam0"), ("AB", "interaction")))
            + ". Marginal means: alpha_clip " + " / ".join(f"{v:g}" for v in a["A_levels"]) + " -> "
            + " / ".join(f"{v:.4f}" for v in a["A_means"]) + "; lam0 " + " / ".join(f"{v:g}" for v in a["B_levels"])
            + " -> " + " / ".join(f"{v:.4f}" for v in a["B_means"]) + ".", ""]


def setting_summary(study, runs, setting: str, out: str | None) -> str:
    metric, data = objective(runs), data_title(runs)
    done = study[study["state"] == "COMPLETE"]
    c, seeds = cells(study), cell_seeds(study)
    c["values"] = [seeds[(seeds[ALPHA] == r[ALPHA]) & (seeds[LAM] == r[LAM])]["value"].tolist() for _, r in c.iterrows()]
    finals = final(runs, metric).set_index("run_dir")["value"]
    checked = mismatched = 0
    for _, t in done.iterrows():
        for path, value in zip(t.get("runs") or [], t["seed_values"] or []):
            if path and value is not None and path in finals.index:
                checked += 1
                mismatched += abs(finals[path] - value) > 1e-9
    states = ", ".join(f"{k} {v}" for k, v in sorted(study["state"].value_counts().items()))
    lines = [f"### {setting}: the two-knob grid on {data}, regenerated from the committed study", "",
             f"Written by `python {NAME}/summarise.py` from `runs/{setting}/study.json` (study "
             f"{study.attrs.get('study_name')}: {len(study)} trials, {states}) and the {runs['run_dir'].nunique()} "
             f"runs under `runs/{setting}/`. Objective: the final {metric}, mean ± SE over seeds (n), COMPLETE trials; "
             f"trials of a cell on one seed averaged first. Per-seed values equal to their committed runs' final "
             f"{metric}: {checked - mismatched} of {checked}.", ""]
    xs, ys = sorted(c[ALPHA].unique()), sorted(c[LAM].unique())
    lines += ["| alpha_clip \\ lam0 | " + " | ".join(f"{y:g}" for y in ys) + " |", "|---" * (len(ys) + 1) + "|"]
    table = c.set_index([ALPHA, LAM])
    for x in xs:
        row = []
        for y in ys:
            if (x, y) not in table.index:
                row.append("")
                continue
            r = table.loc[(x, y)]
            row.append(f"{r['mean']:.3f} ± {r['se']:.3f} (n={int(r['n'])})" if r["n"] > 1 else f"{r['mean']:.3f} (n=1)")
        lines.append(f"| {x:g} | " + " | ".join(row) + " |")
    lines += ["", *anova_lines(c, metric)]
    save(heatmap(study, data, metric=f"final {metric}").figure, out and os.path.join(out, setting), "heatmap")
    plt.close("all")
    lines += [f"Figure: `{setting}/heatmap.png`.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def settings(study: str) -> list[str]:
    root = os.path.join(study, "runs")
    return [s for s in sorted(os.listdir(root)) if os.path.exists(os.path.join(root, s, "study.json"))] \
        if os.path.isdir(root) else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=STUDY, help="the study folder (its runs/<setting>/study.json is read)")
    ap.add_argument("--out", default=None, help="where <setting>/summary.md and the heatmap go (default: --study)")
    ap.add_argument("--readme", action="store_true", help="also write each summary into <study>/README.md's marked block")
    args = ap.parse_args(argv)
    out = args.out or args.study
    found = settings(args.study)
    if not found:
        print(f"no committed study under {os.path.join(args.study, 'runs')}: run.sh exports it there", file=sys.stderr)
        return 1
    for setting in found:
        study = study_frame(os.path.join(args.study, "runs", setting, "study.json"))
        dirs = sorted({d for ds in study["runs"].dropna() for d in ds if d})
        text = setting_summary(study, runs_frame(dirs), setting, out)
        os.makedirs(os.path.join(out, setting), exist_ok=True)
        with open(os.path.join(out, setting, "summary.md"), "w") as f:
            f.write(text)
        if args.readme:
            write_block(os.path.join(args.study, "README.md"), f"summarise.py {setting}", text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
