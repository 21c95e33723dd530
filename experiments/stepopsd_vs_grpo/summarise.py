"""The StepOPSD-vs-GRPO study's tables and figures, regenerated from its committed runs only.

    python experiments/stepopsd_vs_grpo/summarise.py [--study DIR] [--out DIR] [--readme]

Reads `<study>/runs/<setting>/<arm>/seed<k>/` (metrics.csv, config.yaml, overrides.yaml, choices.yaml: what
`experiments/collect.py` copies there; nothing under outputs/) and writes, per setting (heat, pick_two, ...),
`<out>/<setting>/summary.md` and one figure per metric, `<out>/<setting>/<metric>.png`. --study defaults to this
folder, --out to --study; --readme also writes each summary into the study README's marked block
`summarise.py <setting>` (tests/test_studies.py checks that README, summaries and runs agree).

Per setting: every overall validation metric (start at step 0, end at the last step, end - start, mean ± SE over
seeds per arm) and the training rollouts' `success/rate` (each run's mean over its steps); then, for each pair of
arms on shared seeds, the paired difference with its 95 % t-interval, the paired t-test, the equivalence test
(TOST) within ±0.05 and the seeds per arm a 0.05 difference needs given the observed SD of the differences. The
unit of analysis is the seed: runs of one arm and seed are averaged first (stepopsd.stats.per_seed).
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from stepopsd import stats  # noqa: E402
from stepopsd.analysis import (data_title, differences, find_runs, final, paired, per_seed, points, run_mean,  # noqa: E402
                               runs_frame, save, summarise, validation_metrics, write_block)

STUDY = os.path.dirname(os.path.abspath(__file__))
NAME = "experiments/stepopsd_vs_grpo"
PAIRS = (("grpo", "stepopsd"), ("stepopsd", "stepopsd budget_clip=null"), ("grpo", "stepopsd budget_clip=null"))  # b - a
DELTA = EFFECT = 0.05  # the equivalence margin and the effect the power calculation is for: 5 points of success
ALPHA, POWER = 0.05, 0.80
TRAINING = "success/rate"


def seed_list(seeds) -> str:
    """0, 1, 2, 3, 5 -> `0-3, 5`."""
    seeds, out = sorted(int(s) for s in seeds), []
    for s in seeds:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def pm(mean: float, se: float) -> str:
    return f"{mean:.3f} ± {se:.3f}" if se == se else f"{mean:.3f} (n = 1)"


def comparisons(values, arms) -> list[dict]:
    """`paired` (with the TOST at ±DELTA) for every pair of PAIRS both of whose arms are there, then any other pair."""
    pairs = [p for p in PAIRS if set(p) <= set(arms)]
    pairs += [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:] if (a, b) not in pairs and (b, a) not in pairs]
    return [paired(values, a, b, delta=DELTA) for a, b in pairs]


def comparison_table(results: list[dict], what: str) -> list[str]:
    lines = [f"| {what} | seeds | difference ± SE | 95 % CI | t | p | TOST ±{DELTA:g}: p | SD of differences | "
             f"seeds for {EFFECT:g} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["p"] != r["p"]:
            sd = f"{r['sd']:.4f}" if r["sd"] == r["sd"] else "n/a"
            lines.append(f"| {r['b']} - {r['a']} | {r['n']} | {r['mean_diff']:+.4f} | n/a | n/a | n/a | n/a | {sd} | n/a |")
            continue
        need = stats.seeds_for_power(r["sd"], EFFECT, ALPHA, POWER)
        lines.append(f"| {r['b']} - {r['a']} | {r['n']} | {r['mean_diff']:+.4f} ± {r['se']:.4f} | "
                     f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] | {r['t']:.2f} | {stats.fmt_p(r['p'])} | "
                     f"{stats.fmt_p(r['tost']['p'])} | {r['sd']:.4f} | {need} |")
    return lines


def slug(metric: str) -> str:
    return metric.replace("/", "_")


def figure(step_values, results, metric: str, data: str, what: str):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.9), layout="constrained")
    points(summarise(step_values, ["arm", "step"]), "arm", "step", left)
    left.set(title=f"{metric} ({what})\n({data}; mean ± SE over seeds)", xlabel="training step", ylabel=metric)
    left.xaxis.get_major_locator().set_params(integer=True)
    differences(results, metric, data, DELTA, right)
    return fig


def setting_summary(df, setting: str, out: str | None) -> str:
    """The summary of one setting's runs (a Markdown text); its figures saved under <out>/<setting>/."""
    data = data_title(df)
    info = df.drop_duplicates("run_dir")
    arms = sorted(info["arm"].unique(), key=lambda a: ([p for pair in PAIRS for p in pair] + [a]).index(a))
    lines = [f"### {setting}: StepOPSD vs GRPO on {data}, regenerated from the committed runs", "",
             f"Written by `python {NAME}/summarise.py` from the {len(info)} runs under `runs/{setting}/` (experiment "
             f"{', '.join(sorted(info['experiment'].unique()))}; " + "; ".join(
                 f"{arm}: seeds {seed_list(info[info['arm'] == arm]['seed'])}" for arm in arms) + "). "
             "The unit of analysis is the seed (runs of one arm and seed averaged first). Paired comparisons on "
             f"shared seeds: difference ± SE, 95 % t-interval, two-sided paired t-test, equivalence test (TOST) "
             f"within ±{DELTA:g}, the SD of the per-seed differences and the seeds per arm a {EFFECT:g} difference "
             f"needs (two-sided α = {ALPHA:g}, power {POWER:g}, iterating on the t distribution). p-values are "
             "nominal: not corrected for the several comparisons.", ""]
    for metric in validation_metrics(df):
        rows = df[df["metric"] == metric]
        ends = final(df, metric)
        starts = rows[rows["step"] == 0].set_index("run_dir")["value"]
        runs = ends.assign(start=ends["run_dir"].map(starts)).dropna(subset=["start"])
        end_seed = per_seed(ends, "arm")
        start_seed = per_seed(runs.assign(value=runs["start"]), "arm")
        gain_seed = per_seed(runs.assign(value=runs["value"] - runs["start"]), "arm")
        last = seed_list(ends["step"].unique()).replace(", ", "/")
        lines += [f"#### {metric} (validation, {data})", "",
                  f"| arm | seeds | start (step 0) | end (step {last}) | end - start |", "|---|---|---|---|---|"]
        table = {name: summarise(v, "arm").set_index("arm") for name, v in
                 (("start", start_seed), ("end", end_seed), ("gain", gain_seed))}
        for arm in arms:
            e = table["end"].loc[arm]
            s = table["start"].loc[arm] if arm in table["start"].index else None
            g = table["gain"].loc[arm] if arm in table["gain"].index else None
            lines.append(f"| {arm} | {int(e['n'])} | {pm(s['mean'], s['se']) if s is not None else 'n/a'} | "
                         f"{pm(e['mean'], e['se'])} | {pm(g['mean'], g['se']) if g is not None else 'n/a'} |")
        results = comparisons(end_seed, arms)
        lines += ["", *comparison_table(results, "end points, b - a"), ""]
        save(figure(per_seed(rows, ["arm", "step"]), results, metric, data, "validation"),
             out and os.path.join(out, setting), slug(metric))
        lines += [f"Figure: `{setting}/{slug(metric)}.png`.", ""]
    if (df["metric"] == TRAINING).any():
        means = run_mean(df, TRAINING)
        steps = seed_list(means["steps"].unique()).replace(", ", "/")
        values = per_seed(means, "arm")
        lines += [f"#### {TRAINING} (training rollouts: each run's mean over its {steps} steps, {data})", "",
                  "| arm | seeds | mean over steps |", "|---|---|---|"]
        for arm, r in summarise(values, "arm").set_index("arm").reindex(arms).iterrows():
            lines.append(f"| {arm} | {int(r['n'])} | {pm(r['mean'], r['se'])} |")
        results = comparisons(values, arms)
        lines += ["", *comparison_table(results, "run means, b - a"), ""]
        step_values = per_seed(df[df["metric"] == TRAINING], ["arm", "step"])
        save(figure(step_values, results, TRAINING, data, "training rollouts"), out and os.path.join(out, setting), slug(TRAINING))
        lines += [f"Figure: `{setting}/{slug(TRAINING)}.png`.", ""]
    plt.close("all")
    return "\n".join(lines).rstrip("\n") + "\n"


def settings(study: str) -> dict[str, list[str]]:
    """{setting: its committed run folders} for every setting under <study>/runs/ that holds runs."""
    root, found = os.path.join(study, "runs"), {}
    for setting in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            found[setting] = find_runs(os.path.join(root, setting, "*", "seed*"))
        except FileNotFoundError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=STUDY, help="the study folder (its runs/ is read)")
    ap.add_argument("--out", default=None, help="where <setting>/summary.md and the figures go (default: --study)")
    ap.add_argument("--readme", action="store_true", help="also write each summary into <study>/README.md's marked block")
    args = ap.parse_args(argv)
    out = args.out or args.study
    found = settings(args.study)
    if not found:
        print(f"no committed runs under {os.path.join(args.study, 'runs')}: run.sh collects them there", file=sys.stderr)
        return 1
    for setting, dirs in found.items():
        text = setting_summary(runs_frame(dirs), setting, out)
        os.makedirs(os.path.join(out, setting), exist_ok=True)
        with open(os.path.join(out, setting, "summary.md"), "w") as f:
            f.write(text)
        if args.readme:
            write_block(os.path.join(args.study, "README.md"), f"summarise.py {setting}", text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
