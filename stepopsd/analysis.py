"""Read runs and sweeps back as pandas DataFrames, summarise them over seeds, and plot them (the notebooks).

Runs: `run_frame(run_dir)` is one run's CSV metrics (`<run dir>/csv/version_*/metrics.csv`, the latest version)
as a long frame (step, metric, value); `run_info(run_dir)` is what the run was, from its saved Hydra config
(`.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml`); `runs_frame(run_dirs)` is several runs in one long frame
with those info columns. `step` counts training steps: a training row's `train_step` (1..N: the step that
rolled out and updated), a validation's number of steps done (0 = before training; step k = after step k).
Sweeps: `study_frame(storage, study_name)` is an Optuna study, one row per trial.
Statistics over seeds: `summarise` (mean, standard error s/sqrt(n), n), `final` (each run's last value),
`paired` (two arms on shared seeds, paired t-test; `paired_text` says it in a sentence), `cells` (a study's
objective per knob pair). Plots return matplotlib Axes (`curve_grid` a Figure) and never show: `curves`,
`curve_grid`, `heatmap`, `task_bars`; `save` writes a figure to a folder.
Generated data stays labelled: validation metrics are `val_generated/...` on generated games or questions
(`val/...` on official data), the `data` column carries the label and every plot title says it.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf
from scipy import stats

ALPHA, LAM = "algorithm.stepopsd.alpha_clip", "algorithm.stepopsd.lam0"  # the two knobs (sweep param names)
NOUNS = {"alfworld": ("games", "ALFWorld games"), "search": ("questions", "Search-QA questions")}


def metrics_file(run_dir: str) -> str:
    """The latest `csv/version_*/metrics.csv` of a run (a resumed logger writes version_1, ...)."""
    files = sorted(glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv")),
                   key=lambda p: int(p.split("version_")[-1].split(os.sep)[0]))
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}: pass a run directory (outputs/<task>/runs/<time>)")
    return files[-1]


def run_frame(run_dir: str, wide: bool = False) -> pd.DataFrame:
    """One run's metrics: long (step, metric, value), or with `wide` one row per step and a column per metric.
    Empty CSV cells (a metric not logged on that row) are dropped; a logged `nan` stays NaN."""
    raw = pd.read_csv(metrics_file(run_dir), dtype=str, keep_default_na=False)
    done = raw["train_step"] if "train_step" in raw else pd.Series("", index=raw.index)  # training rows only
    step = done.where(done != "", raw["step"]).astype(float).astype(int)
    long = raw.drop(columns=[c for c in ("step", "epoch", "train_step") if c in raw]).assign(step=step)
    long = long.melt(id_vars="step", var_name="metric", value_name="value")
    long = long[long["value"] != ""].astype({"value": float}).sort_values(["metric", "step"], kind="stable")
    long = long.reset_index(drop=True)
    return long.pivot_table(index="step", columns="metric", values="value", aggfunc="last", dropna=False) if wide else long


def data_label(metrics) -> str:
    """`generated` for `val_generated/...` metric names, `official` for `val/...`, `unknown` with no validation."""
    labels = sorted({m.split("/")[0] for m in metrics if re.match(r"val(_[^/]+)?/", m)})
    return "+".join("official" if p == "val" else p[len("val_"):] for p in labels) or "unknown"


def _yaml(run_dir: str, name: str):
    path = os.path.join(run_dir, ".hydra", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: pass a run directory written by train.py (it saves .hydra/{name})")
    with open(path) as f:
        return yaml.safe_load(f)


def run_info(run_dir: str) -> dict:
    """What a run was: experiment, algorithm, seed, the StepOPSD knobs (None for GRPO; budget_clip None = budget
    off), task types, the data label and environment, the sweep trial number (None outside a sweep), and `arm`:
    the algorithm plus its `algorithm.stepopsd.*` command-line overrides (e.g. `stepopsd budget_clip=null`)."""
    cfg, overrides = _yaml(run_dir, "config.yaml"), _yaml(run_dir, "overrides.yaml") or []
    # Hydra saves the config unresolved: `data.task_types: ['${task_type}']` for experiment=alfworld*; the nodes
    # read here resolve lazily (the rest may name Hydra's runtime, which does not exist here)
    data = OmegaConf.to_container(OmegaConf.create(cfg).data, resolve=True)
    choices = _yaml(run_dir, "hydra.yaml")["hydra"]["runtime"]["choices"]
    algo = cfg["algorithm"]["name"]
    knobs = (cfg["algorithm"].get("stepopsd") or {}) if algo == "stepopsd" else {}
    set_knobs = [o.split("algorithm.stepopsd.", 1)[1] for o in overrides if o.startswith("algorithm.stepopsd.")]
    with open(metrics_file(run_dir)) as f:
        header = f.readline().strip().split(",")
    return {"run_dir": run_dir, "experiment": choices.get("experiment"), "algorithm": algo,
            "arm": " ".join([algo, *(set_knobs if algo == "stepopsd" else [])]), "seed": cfg["seed"],
            "alpha_clip": knobs.get("alpha_clip"), "lam0": knobs.get("lam0"), "budget_clip": knobs.get("budget_clip"),
            "task_types": ",".join(data["task_types"]), "val_splits": ",".join(data.get("val_splits") or []),
            "data": data_label(header),
            "env": choices.get("env"), "trial": (cfg.get("trial") or {}).get("number")}


def find_runs(spec: str) -> list[str]:
    """Run directories from an os.pathsep-separated list of paths or globs (`**` recurses: `<sweep dir>/**`),
    keeping those that hold CSV metrics, each run once (a symlink to a listed run is dropped)."""
    found = sorted({d.rstrip(os.sep) for part in spec.split(os.pathsep) if part
                    for d in glob.glob(os.path.expanduser(part), recursive=True)
                    if glob.glob(os.path.join(d, "csv", "version_*", "metrics.csv"))})
    dirs = list({os.path.realpath(d): d for d in reversed(found)}.values())[::-1]  # the first spelling of each
    if not dirs:
        raise FileNotFoundError(f"no run directory with csv/version_*/metrics.csv matches {spec!r}: "
                                f"pass run directories or globs separated by {os.pathsep!r}")
    return dirs


def runs_frame(run_dirs: list[str]) -> pd.DataFrame:
    """Several runs as one long frame: run_info's columns, then step, metric, value."""
    if not run_dirs:
        raise ValueError("runs_frame: no run directories given (see find_runs)")
    return pd.concat([run_frame(d).assign(**run_info(d)) for d in run_dirs], ignore_index=True)


def data_title(frame: pd.DataFrame) -> str:
    """What the numbers are on, for titles: `generated games`, `official ALFWorld games`, ..."""
    def one(data: str, env: str) -> str:
        noun, official = NOUNS.get(env, ("data", "official data"))
        return official if data == "official" else f"{data} {noun}"

    return " + ".join(one(d, e) for d, e in frame[["data", "env"]].drop_duplicates().itertuples(index=False))


def validation_metrics(df: pd.DataFrame) -> list[str]:
    """The overall validation metrics of a frame (`val_generated/valid_seen/success`, not `..._<type>`), in the
    order of the runs' `data.val_splits` (the first split's is the run's metric), then by name."""
    listed = df["val_splits"].dropna().unique() if "val_splits" in df else []
    splits = next((s.split(",") for s in listed if s), [])
    found = (m for m in df["metric"].unique() if re.fullmatch(r"val[^/]*/[^/]+/[a-z]+", m))
    return sorted(found, key=lambda m: (splits.index(m.split("/")[1]) if m.split("/")[1] in splits else len(splits), m))


def study_frame(storage: str, study_name: str) -> pd.DataFrame:
    """An Optuna study, one row per trial: number, state, value (the objective: the mean over seeds), a column
    per param (named by its Hydra override key), then the trial's user attributes: `seeds` and `seed_values`
    (lists, one per seed; None where absent), and what else the sweeper stored (`job_dirs`, `error`, ...).
    `storage`: `sqlite:///path.db` or `journal:///path.log`; `frame.attrs["direction"]`: MAXIMIZE or MINIMIZE."""
    import optuna

    from stepopsd.sweep import open_storage

    path = re.sub(r"^(sqlite|journal):///", "", storage)
    if path != storage and not os.path.exists(path):
        raise FileNotFoundError(f"no study storage at {path}: pass the sweep's storage URL (hydra.sweeper.storage)")
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    frame = pd.DataFrame([{"number": t.number, "state": t.state.name, "value": t.value, **t.params,
                           "seeds": None, "seed_values": None, **t.user_attrs} for t in study.trials])
    frame.attrs["direction"] = study.direction.name
    return frame


def _group(by) -> list[str]:
    return [by] if isinstance(by, str) else list(by)


def summarise(df: pd.DataFrame, by, metric: str | None = None, value: str = "value") -> pd.DataFrame:
    """Mean, standard error (sample std / sqrt(n), NaN for n = 1) and n of `value` per group of `by`, one row
    per seed (run) in each group: put `step` in `by` for curves, or pass `final(df, metric)` for end points."""
    by = _group(by)
    if metric is not None:
        df = df[df["metric"] == metric]
    if df.empty:
        raise ValueError(f"summarise: no rows{f' for metric {metric!r}' if metric else ''}; pick a metric of the frame's 'metric' column")
    if "run_dir" in df and df.groupby(by, dropna=False)["run_dir"].nunique().sum() != len(df):
        raise ValueError(f"summarise: several rows per run in a group of {by}: add 'step' to by, or pass final(df, metric)")
    g = df.groupby(by, dropna=False)[value]
    return pd.DataFrame({"mean": g.mean(), "se": g.std(ddof=1) / np.sqrt(g.count()), "n": g.count()}).reset_index()


def final(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each run's last value of `metric` (one row per run, at its last step)."""
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise ValueError(f"final: no metric {metric!r}; the frame has {', '.join(sorted(df['metric'].unique())[:6])}, ...")
    return rows.sort_values("step", kind="stable").groupby("run_dir", sort=False).tail(1).reset_index(drop=True)


def run_mean(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each run's mean of `metric` over the steps that logged it (one row per run, with `steps`, their count):
    e.g. the training rollouts' `success/rate`, the area under a run's training curve."""
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise ValueError(f"run_mean: no metric {metric!r}; the frame has {', '.join(sorted(df['metric'].unique())[:6])}, ...")
    keep = [c for c in rows.columns if c not in ("step", "metric", "value")]
    out = rows.groupby("run_dir", sort=False).agg(value=("value", "mean"), steps=("step", "nunique")).reset_index()
    return rows.drop_duplicates("run_dir")[keep].merge(out, on="run_dir").assign(metric=metric)


def paired(df: pd.DataFrame, a: str, b: str, by: str = "arm", on: str = "seed", value: str = "value") -> dict:
    """Arm b minus arm a on the seeds both have (one value per run, e.g. `final(...)`): n, the mean difference,
    its standard error sd(d)/sqrt(n), the paired t statistic mean/se (scipy's ttest_rel) and its two-sided
    p-value with n - 1 degrees of freedom (NaN when n < 2 or every difference is equal)."""
    side = {arm: df[df[by] == arm].set_index(on)[value] for arm in (a, b)}
    for arm, s in side.items():
        if s.index.duplicated().any():
            raise ValueError(f"paired: several {value}s for {by}={arm!r} on one {on}: pass one row per run of one "
                             f"experiment (final(df, metric)), or group by what tells the runs apart")
    shared = sorted(set(side[a].index) & set(side[b].index))
    if not shared:
        raise ValueError(f"paired: {by}={a!r} and {by}={b!r} share no {on}; have {sorted(df[by].unique())}")
    d = (side[b][shared] - side[a][shared]).to_numpy(float)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    with np.errstate(all="ignore"):
        t, p = stats.ttest_rel(side[b][shared], side[a][shared]) if len(d) > 1 and se > 0 else (np.nan, np.nan)
    return {"a": a, "b": b, "n": len(d), on + "s": shared, "mean_diff": float(d.mean()), "se": float(se),
            "t": float(t), "p": float(p)}


def paired_text(res: dict, metric: str, data: str, level: float = 0.05) -> str:
    """One sentence for a record: `paired`'s result, with a plain verdict at `level`."""
    head = f"{metric} ({data}), {res['b']} - {res['a']} over n={res['n']} shared seeds: {res['mean_diff']:+.4f}"
    if np.isnan(res["p"]):
        return f"{head} (no t-test: {'one seed' if res['n'] < 2 else 'every difference is equal'})"
    verdict = "significant" if res["p"] < level else "not significant"
    p = f"{res['p']:.3f}" if res["p"] >= 0.001 else f"{res['p']:.1e}"  # never "p = 0.000"
    return f"{head} ± {res['se']:.4f} (SE), paired t = {res['t']:.2f}, p = {p}: {verdict} at {level}"


def provenance(argv: list[str] | None = None) -> str:
    """The line that heads a result table: this machine (cores, CPU model), the git commit and the command."""
    import platform
    import subprocess
    import sys

    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"machine: {os.cpu_count()} cores, {cpu}; commit {commit or '?'}; command: `{' '.join(argv or sys.argv)}`"


def save(fig, folder: str | None, name: str) -> str | None:
    """Write `fig` to `<folder>/<name>.png` (the notebooks' STEPOPSD_FIGURES); None when no folder is given."""
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path := os.path.join(folder, f"{name}.png"), dpi=120)
    return path


def _axes(ax):
    import matplotlib.pyplot as plt

    return ax if ax is not None else plt.subplots(figsize=(5.5, 3.8), layout="constrained")[1]


def _label(key) -> str:
    return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def curves(df: pd.DataFrame, metric: str, by="arm", ax=None):
    """Learning curve of `metric` per group: the mean over seeds with a band of +- one standard error."""
    ax = _axes(ax)
    s = summarise(df, [*_group(by), "step"], metric)
    for key, g in s.groupby(_group(by), dropna=False):
        n = g["n"].max()
        line, = ax.plot(g["step"], g["mean"], marker="o", ms=3, label=f"{_label(key)} (n={n})")
        ax.fill_between(g["step"], g["mean"] - g["se"].fillna(0), g["mean"] + g["se"].fillna(0), color=line.get_color(), alpha=0.2)
    ax.set(title=f"{metric}\n({data_title(df)}; mean ± SE over seeds)", xlabel="training step", ylabel=metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return ax


def curve_grid(df: pd.DataFrame, metrics: list[str], by="arm", cols: int = 3):
    """`curves` of each of `metrics` the frame has, one panel each; returns the Figure."""
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in set(df["metric"])]
    if not metrics:
        raise ValueError(f"curve_grid: none of those metrics in the frame; it has {', '.join(sorted(df['metric'].unique())[:6])}, ...")
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, min(cols, len(metrics)), figsize=(4.6 * min(cols, len(metrics)), 3.4 * rows),
                             layout="constrained", squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        curves(df, m, by, ax=ax)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    return fig


def cells(study: pd.DataFrame, x: str = ALPHA, y: str = LAM) -> pd.DataFrame:
    """The objective per (x, y) cell over the COMPLETE trials: mean, standard error and n over every seed's value
    (`seed_values` less a crashed seed's None, or the trial's value when it stored none)."""
    done = study[study["state"] == "COMPLETE"]
    missing = [k for k in (x, y) if k not in study]
    if missing or done.empty:
        raise ValueError(f"cells: {'no param ' + ', '.join(missing) if missing else 'no COMPLETE trial'} in the study; "
                         f"its columns: {', '.join(study.columns)}")
    values = done.apply(lambda r: r["seed_values"] if isinstance(r["seed_values"], list) else [r["value"]], axis=1)
    per_seed = done[[x, y]].assign(value=values).explode("value").dropna(subset=["value"]).astype({"value": float})
    return summarise(per_seed, [x, y])


def heatmap(study: pd.DataFrame, data: str, x: str = ALPHA, y: str = LAM, ax=None):
    """The objective over (x, y), one cell per value pair, annotated `mean` and `± SE (n)` over seeds; `data`
    names what it was measured on (`generated games`, see data_title), shown in the title."""
    ax = _axes(ax)
    c = cells(study, x, y)
    grid = c.pivot(index=y, columns=x, values="mean")
    im = ax.imshow(grid.to_numpy(float), origin="lower", cmap="viridis", aspect="auto")
    middle = np.nanmean([np.nanmin(grid.to_numpy(float)), np.nanmax(grid.to_numpy(float))])
    for r in c.itertuples(index=False):  # fields: x, y, mean, se, n
        i, j = grid.index.get_loc(r[1]), grid.columns.get_loc(r[0])
        spread = f"± {r.se:.3f}" if r.n > 1 else "± n/a"
        ax.text(j, i, f"{r.mean:.3f}\n{spread} (n={r.n})", ha="center", va="center", fontsize=7,
                color="w" if r.mean < middle else "k")
    ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
    ax.set(xlabel=x, ylabel=y, title=f"objective (mean over seeds)\n({data})")
    ax.figure.colorbar(im, ax=ax)
    return ax


def task_bars(df: pd.DataFrame, metric: str | None = None, by="arm", ax=None):
    """Final validation `metric` per task type (its `<metric>_<type>` metrics, e.g. `.../valid_seen/success_heat`;
    None = the first of validation_metrics) per group: mean bars with +- one standard error over seeds."""
    ax = _axes(ax)
    metric = metric or next(iter(validation_metrics(df)), "val/<split>/success")
    names = sorted(m for m in df["metric"].unique() if m.startswith(metric + "_"))
    if not names:
        raise ValueError(f"task_bars: no per-task-type metric {metric}_<type> in the frame; pass a validation metric")
    finals = pd.concat([final(df, m).assign(task=m[len(metric) + 1:]) for m in names])
    s = summarise(finals, [*_group(by), "task"])
    tasks, groups = sorted(s["task"].unique()), list(s.groupby(_group(by), dropna=False))
    width = 0.8 / len(groups)
    for k, (key, g) in enumerate(groups):
        g = g.set_index("task").reindex(tasks)
        ax.bar(np.arange(len(tasks)) + k * width, g["mean"], width, yerr=g["se"].fillna(0), capsize=3,
               label=f"{_label(key)} (n={g['n'].max():.0f})")
    ax.set_xticks(np.arange(len(tasks)) + width * (len(groups) - 1) / 2, tasks)
    ax.set(title=f"final {metric} per task type\n({data_title(df)}; mean ± SE over seeds)", ylabel=metric.rsplit("/", 1)[-1])
    ax.legend(fontsize=7)
    return ax
