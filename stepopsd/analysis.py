"""Read runs and sweeps back as pandas DataFrames, summarise them over seeds, and plot them (the notebooks).

Runs: `run_frame(run_dir)` is one run's CSV metrics (`<run dir>/csv/version_*/metrics.csv`, the latest version)
as a long frame (step, metric, value); `run_info(run_dir)` is what the run was, from its saved Hydra config
(`.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml`); `runs_frame(run_dirs)` is several runs in one long frame
with those info columns. A committed run (a study's `runs/<setting>/<arm>/seed<k>/`, written by `collect_run`)
holds the same as four small files, `metrics.csv`, `config.yaml` (resolved), `overrides.yaml` and `choices.yaml`
(Hydra's config-group choices), and every reader here takes either layout; `collect` copies finished runs there,
`export_study` an Optuna study to JSON beside them (`study_frame` reads either). `step` counts training steps: a
training row's `train_step` (1..N: the step that rolled out and updated), a validation's number of steps done
(0 = before training; step k = after step k).
Sweeps: `study_frame(storage, study_name)` is an Optuna study, one row per trial.
Statistics over seeds (the formulas: stepopsd/stats.py): `summarise` (mean, standard error s/sqrt(n), n),
`final` (each run's last value), `per_seed` (runs of one arm and seed averaged: the unit of analysis is the seed),
`paired` (two arms on shared seeds: paired t-test, 95 % t-interval, TOST equivalence at ±delta; `paired_text`
says it in a sentence), `cells` (a study's objective per knob pair). Plots return matplotlib Axes (`curve_grid`
a Figure) and never show: `curves` (measured points only, y from 0), `curve_grid`, `differences` (paired
intervals), `heatmap` (a colourbar naming the metric), `task_bars`; `save` writes a figure to a folder.
Generated data stays labelled: validation metrics are `val_generated/...` on generated games or questions
(`val/...` on official data), the `data` column carries the label and every plot title says it.
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from stepopsd import stats
from stepopsd.stats import per_seed  # noqa: F401  (re-exported: the unit of analysis is the seed)

ALPHA, LAM = "algorithm.stepopsd.alpha_clip", "algorithm.stepopsd.lam0"  # the two knobs (sweep param names)
NOUNS = {"alfworld": ("games", "ALFWorld games"), "search": ("questions", "Search-QA questions")}


COMMITTED = ("metrics.csv", "config.yaml", "overrides.yaml", "choices.yaml")  # a committed run's files


def is_committed_run(run_dir: str) -> bool:
    """A study's committed copy of a run (`collect_run`): its files in the folder itself, no `.hydra/`."""
    return all(os.path.isfile(os.path.join(run_dir, f)) for f in COMMITTED)


def metrics_file(run_dir: str) -> str:
    """The latest `csv/version_*/metrics.csv` of a run (a resumed logger writes version_1, ...); a committed
    run's `metrics.csv`."""
    if is_committed_run(run_dir):
        return os.path.join(run_dir, "metrics.csv")
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
    if is_committed_run(run_dir):
        with open(os.path.join(run_dir, name)) as f:
            return yaml.safe_load(f)
    path = os.path.join(run_dir, ".hydra", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: pass a run directory written by train.py (it saves .hydra/{name})")
    with open(path) as f:
        return yaml.safe_load(f)


def _choices(run_dir: str) -> dict:
    """Hydra's config-group choices of a run (experiment, env, algorithm, ...)."""
    if is_committed_run(run_dir):
        return _yaml(run_dir, "choices.yaml")
    return _yaml(run_dir, "hydra.yaml")["hydra"]["runtime"]["choices"]


def run_info(run_dir: str) -> dict:
    """What a run was: experiment, algorithm, seed, the StepOPSD knobs (None for GRPO; budget_clip None = budget
    off), task types, the data label and environment, the sweep trial number (None outside a sweep), and `arm`:
    the run's `arm` label when it has one (a study's run.sh sets it: `arm=lr0`), else the algorithm plus its
    `algorithm.stepopsd.*` command-line overrides (e.g. `stepopsd budget_clip=null`)."""
    cfg, overrides = _yaml(run_dir, "config.yaml"), _yaml(run_dir, "overrides.yaml") or []
    # Hydra saves the config unresolved: `data.task_types: ['${task_type}']` for experiment=alfworld*; the nodes
    # read here resolve lazily (the rest may name Hydra's runtime, which does not exist here)
    data = OmegaConf.to_container(OmegaConf.create(cfg).data, resolve=True)
    choices = _choices(run_dir)
    algo = cfg["algorithm"]["name"]
    knobs = (cfg["algorithm"].get("stepopsd") or {}) if algo == "stepopsd" else {}
    set_knobs = [o.split("algorithm.stepopsd.", 1)[1] for o in overrides if o.startswith("algorithm.stepopsd.")]
    with open(metrics_file(run_dir)) as f:
        header = f.readline().strip().split(",")
    return {"run_dir": run_dir, "experiment": choices.get("experiment"), "algorithm": algo,
            "arm": cfg.get("arm") or " ".join([algo, *(set_knobs if algo == "stepopsd" else [])]), "seed": cfg["seed"],
            "alpha_clip": knobs.get("alpha_clip"), "lam0": knobs.get("lam0"), "budget_clip": knobs.get("budget_clip"),
            "task_types": ",".join(data["task_types"]), "val_splits": ",".join(data.get("val_splits") or []),
            "data": data_label(header),
            "env": choices.get("env"), "trial": (cfg.get("trial") or {}).get("number")}


def find_runs(spec: str) -> list[str]:
    """Run directories from an os.pathsep-separated list of paths or globs (`**` recurses: `<sweep dir>/**`),
    keeping those that hold CSV metrics (a training run's or a committed run's), each run once (a symlink to a
    listed run is dropped)."""
    found = sorted({d.rstrip(os.sep) for part in spec.split(os.pathsep) if part
                    for d in glob.glob(os.path.expanduser(part), recursive=True)
                    if glob.glob(os.path.join(d, "csv", "version_*", "metrics.csv")) or is_committed_run(d)})
    dirs = list({os.path.realpath(d): d for d in reversed(found)}.values())[::-1]  # the first spelling of each
    if not dirs:
        raise FileNotFoundError(f"no run directory with csv/version_*/metrics.csv (or a committed run's "
                                f"{', '.join(COMMITTED)}) matches {spec!r}: "
                                f"pass run directories or globs separated by {os.pathsep!r}")
    return dirs


def runs_frame(run_dirs: list[str]) -> pd.DataFrame:
    """Several runs as one long frame: run_info's columns, then step, metric, value."""
    if not run_dirs:
        raise ValueError("runs_frame: no run directories given (see find_runs)")
    return pd.concat([run_frame(d).assign(**run_info(d)) for d in run_dirs], ignore_index=True)


def resolved_config(run_dir: str) -> dict:
    """A training run's config with its interpolations resolved: `.hydra/config.yaml`, where `${hydra:x}` reads
    the run's own `.hydra/hydra.yaml` (Hydra's runtime is gone once the run has ended) and `${oc.env:...}` this
    process's environment; a committed run's `config.yaml` (already resolved) as it is."""
    if is_committed_run(run_dir):
        return _yaml(run_dir, "config.yaml")
    with open(os.path.join(run_dir, ".hydra", "config.yaml")) as f:
        cfg = yaml.safe_load(re.sub(r"\$\{hydra:([^}]+)\}", r"${hydra.\1}", f.read()))
    conf = OmegaConf.create({**cfg, "hydra": _yaml(run_dir, "hydra.yaml")["hydra"]})
    return {k: OmegaConf.to_container(conf[k], resolve=True) if OmegaConf.is_config(conf[k]) else conf[k] for k in cfg}


def arm_folder(arm: str) -> str:
    """A study folder's name for an arm: `stepopsd budget_clip=null` -> `stepopsd_budget_clip=null` (the arm is
    read back from the run's overrides, never from this name)."""
    return "_".join(arm.split()).replace(os.sep, "_")


def collect_run(run_dir: str, runs_dir: str, replace: bool = False) -> str:
    """Copy a finished run into a study's committed layout, `<runs_dir>/<arm>/seed<k>/` (`runs_dir` is
    `experiments/<study>/runs/<setting>`): its metrics.csv (the latest version), its config resolved
    (`resolved_config`), its overrides and Hydra's choices. Returns the folder. The same run collected again is a
    no-op; another run of the same arm and seed raises FileExistsError unless `replace`."""
    info = run_info(run_dir)
    with open(metrics_file(run_dir)) as f:
        metrics = f.read()
    files = {"metrics.csv": metrics,
             "config.yaml": yaml.safe_dump(resolved_config(run_dir), sort_keys=False),
             "overrides.yaml": yaml.safe_dump(_yaml(run_dir, "overrides.yaml") or [], sort_keys=False),
             "choices.yaml": yaml.safe_dump(_choices(run_dir), sort_keys=False)}
    dest = os.path.join(runs_dir, arm_folder(info["arm"]), f"seed{info['seed']}")
    if os.path.isdir(dest) and not replace:
        with open(os.path.join(dest, "metrics.csv")) as f:
            if f.read() == metrics:
                return dest
        raise FileExistsError(f"{dest} holds another run of arm {info['arm']!r}, seed {info['seed']} (not {run_dir}): "
                              f"pass replace=True (--replace) to overwrite it")
    os.makedirs(dest, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(dest, name), "w") as f:
            f.write(text)
    return dest


def collect(spec: str, runs_dir: str, replace: bool = False) -> dict[str, str]:
    """`collect_run` for every run `find_runs(spec)` lists; {run dir: committed folder}."""
    return {d: collect_run(d, runs_dir, replace) for d in find_runs(spec)}


def export_study(storage: str, study_name: str, path: str, runs: dict[str, str] | None = None) -> dict:
    """Write an Optuna study to JSON (`path`), one entry per trial: number, state, value, params, user
    attributes (`seeds`, `seed_values`, `job_dirs`, ...), and `runs`, the committed copies of the trial's job
    dirs (`runs`: {job dir: committed folder}, as `collect` returns) relative to the JSON's folder; the sweeper's
    `optimization_results.yaml` beside the jobs, when there is one. `study_frame(path)` reads it back."""
    import optuna

    from stepopsd.sweep import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    runs = {os.path.realpath(k): v for k, v in (runs or {}).items()}
    here = os.path.dirname(os.path.abspath(path))

    def committed(job_dir):
        dest = runs.get(os.path.realpath(job_dir)) if job_dir else None
        return os.path.relpath(dest, here) if dest else None

    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
               "user_attrs": dict(t.user_attrs),
               "runs": [committed(d) for d in t.user_attrs.get("job_dirs") or []]} for t in study.trials]
    jobs = [d for t in study.trials for d in t.user_attrs.get("job_dirs") or [] if d]
    records = sorted({os.path.join(os.path.dirname(d), "optimization_results.yaml") for d in jobs})
    records = [r for r in records if os.path.exists(r)]
    result = None
    if records:
        with open(max(records, key=os.path.getmtime)) as f:
            result = yaml.safe_load(f)
    out = {"study_name": study_name, "direction": study.direction.name, "storage": storage, "trials": trials,
           "optimization_results": result}
    os.makedirs(here, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=False)
        f.write("\n")
    return out


def collect_study(storage: str, study_name: str, runs_dir: str, replace: bool = False) -> str:
    """A sweep into a study's committed layout: every trial's job dirs that still exist go through `collect_run`
    into `runs_dir`, and the study is exported to `<runs_dir>/study.json` with the trials pointing at those
    copies. Returns the JSON's path."""
    study = study_frame(storage, study_name)
    jobs = [d for ds in study.get("job_dirs", pd.Series(dtype=object)).dropna() for d in ds if d and os.path.isdir(d)]
    finished = [d for d in jobs if glob.glob(os.path.join(d, "csv", "version_*", "metrics.csv"))]
    copied = {d: collect_run(d, runs_dir, replace) for d in finished}
    path = os.path.join(runs_dir, "study.json")
    export_study(storage, study_name, path, copied)
    return path


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


def study_frame(storage: str, study_name: str | None = None) -> pd.DataFrame:
    """An Optuna study, one row per trial: number, state, value (the objective: the mean over seeds), a column
    per param (named by its Hydra override key), then the trial's user attributes: `seeds` and `seed_values`
    (lists, one per seed; None where absent), and what else the sweeper stored (`job_dirs`, `error`, ...).
    `storage`: `sqlite:///path.db`, `journal:///path.log`, or a study's JSON export (`export_study`; then a
    `runs` column: the committed copies of the trial's jobs, as paths that exist here, and the study's name is
    optional); `frame.attrs["direction"]`: MAXIMIZE or MINIMIZE."""
    if storage.endswith(".json"):
        if not os.path.exists(storage):
            raise FileNotFoundError(f"no study export at {storage}: pass a study.json written by export_study "
                                    f"(experiments/collect.py --study), or the sweep's storage URL")
        with open(storage) as f:
            exported = json.load(f)
        if study_name not in (None, exported["study_name"]):
            raise ValueError(f"{storage} holds study {exported['study_name']!r}, not {study_name!r}")
        here = os.path.dirname(os.path.abspath(storage))
        frame = pd.DataFrame([{"number": t["number"], "state": t["state"], "value": t["value"], **t["params"],
                               "seeds": None, "seed_values": None, **t["user_attrs"],
                               "runs": [os.path.normpath(os.path.join(here, r)) if r else None for r in t["runs"]]}
                              for t in exported["trials"]])
        frame.attrs |= {"direction": exported["direction"], "study_name": exported["study_name"],
                        "optimization_results": exported.get("optimization_results")}
        return frame
    if study_name is None:
        raise ValueError("study_frame: a study name is needed with a storage URL (only a JSON export names its study)")
    import optuna

    from stepopsd.sweep import open_storage

    path = re.sub(r"^(sqlite|journal):///", "", storage)
    if path != storage and not os.path.exists(path):
        raise FileNotFoundError(f"no study storage at {path}: pass the sweep's storage URL (hydra.sweeper.storage)")
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    frame = pd.DataFrame([{"number": t.number, "state": t.state.name, "value": t.value, **t.params,
                           "seeds": None, "seed_values": None, **t.user_attrs} for t in study.trials])
    frame.attrs |= {"direction": study.direction.name, "study_name": study_name}
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


def paired(df: pd.DataFrame, a: str, b: str, by: str = "arm", on: str = "seed", value: str = "value",
           level: float = 0.95, delta: float | None = None) -> dict:
    """Arm b minus arm a on the seeds both have (one value per seed: pass `per_seed(final(...))` when an arm has
    several runs of a seed): n, the mean difference, its standard error sd(d)/sqrt(n), the paired t statistic
    mean/se and its two-sided p-value with n - 1 degrees of freedom (NaN when n < 2 or every difference is
    equal), `sd` (of the differences), `ci` (the `level` t-interval) and, with `delta`, `tost`: the paired
    equivalence test for the margin ±delta (stepopsd.stats.tost)."""
    side = {arm: df[df[by] == arm].set_index(on)[value] for arm in (a, b)}
    for arm, s in side.items():
        if s.index.duplicated().any():
            raise ValueError(f"paired: several {value}s for {by}={arm!r} on one {on}: pass one row per run of one "
                             f"experiment (final(df, metric)), averaged per seed (per_seed), or group by what tells "
                             f"the runs apart")
    shared = sorted(set(side[a].index) & set(side[b].index))
    if not shared:
        raise ValueError(f"paired: {by}={a!r} and {by}={b!r} share no {on}; have {sorted(df[by].unique())}")
    res = stats.paired_test(side[a][shared].to_numpy(float), side[b][shared].to_numpy(float), level)
    out = {"a": a, "b": b, "n": res["n"], on + "s": shared, "mean_diff": res["mean_diff"], "se": res["se"],
           "t": res["t"], "p": res["p"], "sd": res["sd"], "df": res["df"], "ci": res["ci"], "level": level}
    if delta is not None:
        out["tost"] = stats.tost(res["mean_diff"], res["se"], res["n"], delta)
    return out


def paired_text(res: dict, metric: str, data: str, level: float = 0.05) -> str:
    """One sentence for a record: `paired`'s result (with its t-interval and equivalence test when it has them),
    with a plain verdict at `level`."""
    head = f"{metric} ({data}), {res['b']} - {res['a']} over n={res['n']} shared seeds: {res['mean_diff']:+.4f}"
    if np.isnan(res["p"]):
        return f"{head} (no t-test: {'one seed' if res['n'] < 2 else 'every difference is equal'})"
    verdict = "significant" if res["p"] < level else "not significant"
    ci = ""
    if "ci" in res and not np.isnan(res["ci"][0]):
        ci = f", {100 * res.get('level', 0.95):g} % CI [{res['ci'][0]:+.4f}, {res['ci'][1]:+.4f}]"
    text = f"{head} ± {res['se']:.4f} (SE){ci}, paired t = {res['t']:.2f}, p = {stats.fmt_p(res['p'])}: {verdict} at {level}"
    if res.get("tost") and not np.isnan(res["tost"]["p"]):
        tost, delta = res["tost"], res["tost"]["delta"]
        text += (f"; equivalence (TOST) within ±{delta:g}: p = {stats.fmt_p(tost['p'])} "
                 f"({'equivalent' if tost['p'] < level else 'not shown'} at {level})")
    return text


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


def _from_zero(ax, lows) -> None:
    """y from 0 when nothing drawn is below it (success rates, counts); a signed metric keeps its own range."""
    lows = np.asarray(lows, float)
    if lows.size and np.nanmin(lows) >= 0:
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-9))


def points(s: pd.DataFrame, by, x: str = "step", ax=None):
    """Draw summaries (`summarise`'s mean, se, n per group of `by` and `x`) as measured points only: a group
    with 3 or more points is a line through markers with a band of ± one SE; one with 1-2 points is markers
    with ± SE error bars and no line (nothing is implied between two measurements), the groups dodged apart
    along x so that equal points stay visible. The y-axis starts at 0 when every value is >= 0."""
    ax = _axes(ax)
    groups = list(s.groupby(_group(by), dropna=False))
    span = float(s[x].max() - s[x].min()) or 1.0
    lows = []
    for k, (key, g) in enumerate(groups):
        g = g.sort_values(x)
        se = g["se"].fillna(0).to_numpy(float)
        label = f"{_label(key)} (n={g['n'].max()})"
        if len(g) >= 3:
            line, = ax.plot(g[x], g["mean"], marker="o", ms=4, label=label)
            ax.fill_between(g[x], g["mean"] - se, g["mean"] + se, color=line.get_color(), alpha=0.2)
        else:
            dodge = (k - (len(groups) - 1) / 2) * 0.02 * span
            ax.errorbar(g[x] + dodge, g["mean"], yerr=se, fmt="o", ms=5, capsize=3, label=label)
        lows.extend(g["mean"] - se)
    _from_zero(ax, lows)
    ax.legend(fontsize=7)
    return ax


def curves(df: pd.DataFrame, metric: str, by="arm", ax=None):
    """Learning curve of `metric` per group: the mean over seeds ± one standard error at each measured step
    (`points`: markers only where a group has fewer than 3 measured steps), y from 0 for non-negative metrics."""
    ax = points(summarise(df, [*_group(by), "step"], metric), by, "step", ax)
    ax.set(title=f"{metric}\n({data_title(df)}; mean ± SE over seeds)", xlabel="training step", ylabel=metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return ax


def differences(results: list[dict], metric: str, data: str, delta: float | None = None, ax=None,
                xlabel: str | None = None):
    """Paired differences (`paired` results, or stepopsd.stats.paired_summary ones with `a`/`b` or `label`
    added) as points with their t-intervals (`ci`), a line at 0 and, with `delta`, the equivalence margins ±delta
    dashed. One row per result from the top, labelled `b - a (n=...)` (or its `label`); `xlabel` defaults to
    `paired difference in <metric>`."""
    ax = _axes(ax)
    for i, r in enumerate(results):
        lo, hi = r["ci"]
        err = [[r["mean_diff"] - lo], [hi - r["mean_diff"]]] if not np.isnan(lo) else None
        ax.errorbar([r["mean_diff"]], [i], xerr=err, fmt="o", ms=5, capsize=3, color="C0")
    ax.axvline(0, color="k", lw=0.8)
    if delta:
        for side in (-delta, delta):
            ax.axvline(side, color="C3", ls="--", lw=0.8)
        ax.plot([], [], color="C3", ls="--", lw=0.8, label=f"equivalence margin ±{delta:g}")
        ax.legend(fontsize=7)
    labels = [r.get("label") or f"{r['b']} - {r['a']} (n={r['n']})" for r in results]
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.set_ylim(len(results) - 0.5, -0.5)  # the first result on top
    level = 100 * (results[0].get("level", 0.95) if results else 0.95)
    ax.set(xlabel=xlabel or f"paired difference in {metric}",
           title=f"paired differences over seeds, {level:g} % t-intervals\n({data})")
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


def cell_seeds(study: pd.DataFrame, x: str = ALPHA, y: str = LAM) -> pd.DataFrame:
    """The objective per (x, y) cell and seed over the COMPLETE trials: one row per cell and seed (x, y, seed,
    value, runs), each seed's value from `seed_values` (less a crashed seed's None; the trial's value when it
    stored none, the trial then counting as one unit), several trials of a cell on one seed averaged
    (stats.per_seed): the unit of analysis is the seed."""
    done = study[study["state"] == "COMPLETE"]
    missing = [k for k in (x, y) if k not in study]
    if missing or done.empty:
        raise ValueError(f"cells: {'no param ' + ', '.join(missing) if missing else 'no COMPLETE trial'} in the study; "
                         f"its columns: {', '.join(study.columns)}")
    values = done.apply(lambda r: r["seed_values"] if isinstance(r["seed_values"], list) else [r["value"]], axis=1)
    seeds = done.apply(lambda r: r["seeds"] if isinstance(r["seeds"], list) and len(r["seeds"]) == len(values[r.name])
                       else [f"trial{r['number']}"] * len(values[r.name]), axis=1)
    rows = done[[x, y]].assign(value=values, seed=seeds).explode(["value", "seed"]).dropna(subset=["value"])
    return per_seed(rows.astype({"value": float}), [x, y])


def cells(study: pd.DataFrame, x: str = ALPHA, y: str = LAM) -> pd.DataFrame:
    """The objective per (x, y) cell over the COMPLETE trials: mean, standard error and n over its seeds
    (`cell_seeds`: one value per seed)."""
    return summarise(cell_seeds(study, x, y), [x, y])


def heatmap(study: pd.DataFrame, data: str, x: str = ALPHA, y: str = LAM, ax=None, metric: str = "objective"):
    """The objective over (x, y), one cell per value pair, annotated `mean` and `± SE (n)` over seeds, with a
    colourbar labelled `metric` (what the objective is: e.g. `val_generated/valid_seen/success`), its scale from 0
    for a non-negative metric; `data` names what it was measured on (`generated games`, see data_title), shown in
    the title."""
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.subplots(figsize=(7, 4.8), layout="constrained")[1]
    c = cells(study, x, y)
    grid = c.pivot(index=y, columns=x, values="mean")
    low = 0 if np.nanmin(grid.to_numpy(float)) >= 0 else None  # the colour scale from 0 for a non-negative metric
    im = ax.imshow(grid.to_numpy(float), origin="lower", cmap="viridis", aspect="auto", vmin=low)
    middle = np.nanmean([np.nanmin(grid.to_numpy(float)) if low is None else low, np.nanmax(grid.to_numpy(float))])
    for r in c.itertuples(index=False):  # fields: x, y, mean, se, n
        i, j = grid.index.get_loc(r[1]), grid.columns.get_loc(r[0])
        spread = f"± {r.se:.3f}" if r.n > 1 else "± n/a"
        ax.text(j, i, f"{r.mean:.3f}\n{spread} (n={r.n})", ha="center", va="center", fontsize=7,
                color="w" if r.mean < middle else "k")
    ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
    ax.set(xlabel=x, ylabel=y, title=f"{metric}: mean over seeds\n({data})")
    ax.figure.colorbar(im, ax=ax).set_label(metric, fontsize=8)
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
    ax.set_ylim(bottom=0)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(groups) - 1) / 2, tasks)
    ax.set(title=f"final {metric} per task type\n({data_title(df)}; mean ± SE over seeds)", ylabel=metric.rsplit("/", 1)[-1])
    ax.legend(fontsize=7)
    return ax


def block_markers(name: str) -> tuple[str, str]:
    return (f"<!-- BEGIN {name} (written by code: do not edit by hand) -->", f"<!-- END {name} -->")


def read_block(path: str, name: str) -> str | None:
    """The text between a file's markers for `name` (`write_block`), None when it has none."""
    begin, end = block_markers(name)
    with open(path) as f:
        text = f.read()
    if begin not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def write_block(path: str, name: str, body: str) -> None:
    """Put `body` between the markers for `name` in the file at `path` (a study README: the numbers it quotes are
    then what the code computed, and tests/test_studies.py checks them); appended at the end when absent."""
    begin, end = block_markers(name)
    with open(path) as f:
        text = f.read()
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
