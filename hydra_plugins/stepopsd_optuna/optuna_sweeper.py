"""A Hydra sweeper on Optuna's ask-and-tell API: `python train.py -m hparams_search=two_knob ...`.

Why our own: hydra-optuna-sweeper 1.3 pins optuna<3, its 1.4 pre-releases need hydra-core 1.4 pre-releases,
it has no pruning, and re-running it on the same storage adds another `n_trials` with the trials of a killed
sweep left RUNNING for ever. This one keeps its YAML surface (`hydra.sweeper.params` in Hydra's sweep syntax,
`direction`, `n_trials`, `n_jobs`, `sampler`, `storage`, `study_name`) and adds:

- `seeds_per_trial`: each trial runs that many jobs (`seed=base, base+1, ...`); the objective is their
  mean, each seed's value is kept on the trial (`seeds`, `seed_values`, `job_dirs` user attributes);
- resume: the study lives on `storage` (SQLite, or `journal:///file` across nodes), the same command run
  again continues it to `n_trials` trials in total; trials a killed sweep left RUNNING are marked FAIL
  (`interrupted`) and asked again with the same parameters (one killed inside `ask`, before all of its
  parameters were drawn, keeps the ones it had and draws the rest; its jobs had not started);
- pruning: `pruner` (an Optuna pruner, `_target_`); the first seed's job reports every validation to its trial
  and stops early when pruned (stepopsd/sweep.py), recorded PRUNED;
- a crashing trial is recorded FAIL (its traceback in `<job dir>/error.txt`) and the sweep goes on until more
  than `max_failure_rate` of `n_trials` have failed; a user error (a bad knob: `train.py`'s one-line
  errors) stops the sweep at once with that line, as does a bad sweep config.

`n_jobs` trials are asked at a time and launched together through the configured launcher (Hydra's basic
launcher runs them one after another; hydra-joblib-launcher in parallel, hydra-submitit-launcher on SLURM).
The best trial goes to `<sweep dir>/optimization_results.yaml`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import traceback
from decimal import Decimal
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from stepopsd.errors import RunFailed, UserError
from stepopsd.sweep import open_storage

log = logging.getLogger(__name__)
MISSING = object()


class SweepError(UserError, ValueError):
    """A bad sweep config or a trial that hit a user error: one line, the sweep stops."""


def distribution(key: str, spec):
    """Hydra's sweep syntax -> an Optuna distribution: choice(...) -> categorical; range(start, stop[, step]) -> int
    (float if a bound or the step is a float) with that step, so that the sampler sees the values' order;
    interval(a, b) -> float (tag(log, ...) for log scale, tag(int, ...) for integers)."""
    if isinstance(spec, ChoiceSweep):
        return CategoricalDistribution(list(spec.list))
    if isinstance(spec, RangeSweep):
        return range_distribution(key, spec)
    if isinstance(spec, IntervalSweep):
        log_scale, start, end = "log" in spec.tags, spec.start, spec.end
        if not start < end or (log_scale and start <= 0):
            raise SweepError(f"hydra.sweeper.params.{key}: interval({start}, {end}) needs start < end (> 0 on a log scale)")
        if "int" in spec.tags:
            return IntDistribution(int(start), int(end), log=log_scale)
        return FloatDistribution(float(start), float(end), log=log_scale)
    raise SweepError(f"hydra.sweeper.params.{key}={spec!r}: use choice(...), range(...), interval(a, b) or "
                     "tag(log, interval(a, b))")


def range_distribution(key: str, spec: RangeSweep):
    """range(start, stop[, step]) as Python's range (stop excluded, a negative step counts down) -> the int or
    float distribution over exactly its points: low = the smallest, high = the largest, step = |step|. Float
    points are counted in decimal (range(0, 1, 0.1) has 10 points, 0.3 not 0.30000000000000004)."""
    start, stop, step = spec.start, spec.stop, 1 if spec.step is None else spec.step
    text = f"hydra.sweeper.params.{key}: range({start}, {stop}, {step})"
    if "log" in spec.tags:
        raise SweepError(f"{text}: a log scale needs an interval, tag(log, interval(a, b))")
    if step == 0:
        raise SweepError(f"{text}: the step must not be 0")
    if any(isinstance(v, float) for v in (start, stop, step)):
        first, delta = Decimal(str(start)), Decimal(str(step))
        count = max(0, math.ceil((Decimal(str(stop)) - first) / delta))
        points = [first + i * delta for i in range(count)]
        if points:
            return FloatDistribution(float(min(points)), float(max(points)), step=float(abs(delta)))
    else:
        points = list(range(int(start), int(stop), int(step)))
        if points:
            return IntDistribution(min(points), max(points), step=abs(int(step)))
    raise SweepError(f"{text} has no values")


def grid_points(dist) -> list | None:
    """The values a GridSampler walks for a distribution: a categorical's choices, every point of an int or a
    stepped float one (a range), in order; None for a continuous one (an interval)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        low, step = Decimal(str(dist.low)), Decimal(str(dist.step))
        return [float(low + i * step) for i in range(int((Decimal(str(dist.high)) - low) / step) + 1)]
    return None


def override_value(value) -> str:
    """A parameter value as Hydra override text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


class OptunaSweeper(Sweeper):
    def __init__(self, params=None, direction: str = "maximize", n_trials: int | None = 20, n_jobs: int = 1,
                 seeds_per_trial: int = 1, sampler=None, pruner=None, storage: str | None = None,
                 study_name: str | None = None, max_failure_rate: float = 0.25):
        self.params = dict(params or {})
        self.direction, self.n_trials, self.n_jobs, self.seeds = direction, n_trials, n_jobs, seeds_per_trial
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.storage, self.study_name, self.max_failure_rate = storage, study_name, max_failure_rate

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                                config=config)

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except SweepError as e:
            print(f"train.py -m: error: {e}", file=sys.stderr)
            sys.exit(2)

    # --- the plan: search space, fixed overrides, study -----------------------------------------------------
    def _space(self, arguments: list[str]) -> tuple[dict, dict[str, str], list[str]]:
        """(name -> distribution, name -> override key, fixed overrides for every job). Sweeps given on the
        command line (`key=choice(...)`) join or replace `hydra.sweeper.params`; a plain `key=value` there
        takes the key out of the search."""
        parser = OverridesParser.create()
        space, keys, fixed = {}, {}, []
        try:
            parsed = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()])
            command_line = parser.parse_overrides(arguments)
        except Exception as e:  # hydra's grammar errors are several lines
            raise SweepError(f"hydra.sweeper.params: {str(e).splitlines()[0]}") from None
        own = ("seed", "trial.number", "trial.study", "trial.storage", "trial.report")  # set per job below
        for o in parsed + command_line:
            name = o.get_key_element().lstrip("+~")
            if not o.is_sweep_override():
                if name not in own:
                    fixed.append(o.input_line)
                    space.pop(name, None)  # a value given on the command line is not searched
                    keys.pop(name, None)
                continue
            if not o.get_key_element().startswith("+") and OmegaConf.select(self.config, name, default=MISSING) is MISSING:
                raise SweepError(f"hydra.sweeper.params: no config key {name!r} in the composed config (check the "
                                 "spelling and the groups chosen, e.g. algorithm=stepopsd for algorithm.stepopsd.*)")
            space[name], keys[name] = distribution(name, o.value()), o.get_key_element()
        if not space:
            raise SweepError("hydra.sweeper.params is empty: name one or more config keys to search, "
                             "e.g. algorithm.stepopsd.lam0: interval(0.05, 0.2)")
        return space, keys, fixed

    def _check(self, space: dict) -> int:
        """The knobs (one-line errors); returns the number of trials the study is to hold."""
        if self.direction not in ("maximize", "minimize"):
            raise SweepError(f"hydra.sweeper.direction={self.direction!r}: use maximize or minimize")
        grid = self._is_grid()
        if grid and any(grid_points(d) is None for d in space.values()):
            raise SweepError("hydra.sweeper.sampler is a GridSampler: give every parameter as choice(...) or range(...)")
        size = math.prod(len(grid_points(d)) for d in space.values()) if grid else None
        n_trials = self.n_trials if self.n_trials is not None else size
        if not isinstance(n_trials, int) or n_trials < 1 or (size is not None and n_trials > size):
            raise SweepError(f"hydra.sweeper.n_trials={self.n_trials}: need an integer >= 1"
                             + (f" and <= the grid's {size} points (null = the whole grid)" if size else ""))
        if not (isinstance(self.n_jobs, int) and self.n_jobs >= 1 and isinstance(self.seeds, int) and self.seeds >= 1):
            raise SweepError(f"hydra.sweeper.n_jobs={self.n_jobs}, seeds_per_trial={self.seeds}: need integers >= 1")
        if not 0 <= self.max_failure_rate <= 1:
            raise SweepError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: need a fraction in [0, 1]")
        if not self.study_name or not self.storage:
            raise SweepError("hydra.sweeper.study_name and hydra.sweeper.storage must be set (the study outlives the sweep)")
        return n_trials

    def _is_grid(self) -> bool:
        return bool(self.sampler_cfg) and str(self.sampler_cfg.get("_target_", "")).endswith("GridSampler")

    def _build(self, what: str, cfg, **extra):
        try:
            return instantiate(cfg, **extra) if cfg else None
        except Exception as e:
            raise SweepError(f"hydra.sweeper.{what}: {str(e).splitlines()[0]}") from None

    def _study(self, space: dict) -> optuna.Study:
        grid = {k: grid_points(d) for k, d in space.items()} if self._is_grid() else {}
        extra = {"search_space": grid} if grid else {}
        try:
            storage = open_storage(self.storage)  # a URL (a database) or a storage object (a journal file)
            if isinstance(storage, str):  # the object, so that `_recover` can reach trials through its public API
                storage = optuna.storages.RDBStorage(storage)
            self.storage_backend = storage
            existing = (len(optuna.load_study(study_name=self.study_name, storage=storage).trials)
                        if self.study_name in optuna.get_all_study_names(storage) else 0)
        except Exception as e:  # a bad URL, an unreachable database, a driver not installed
            raise SweepError(f"hydra.sweeper.storage={self.storage}: {str(e).splitlines()[0]}") from None
        if existing and self.sampler_cfg and self.sampler_cfg.get("seed") is not None:
            # a resumed sweep: a sampler seeded as before would draw its first trials' parameters again
            extra["seed"] = int(self.sampler_cfg.seed) + existing
        sampler = self._build("sampler", self.sampler_cfg, **extra)
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                    pruner=self._build("pruner", self.pruner_cfg) or optuna.pruners.NopPruner(),
                                    direction=self.direction,
                                    load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise SweepError(f"study {self.study_name!r} in {self.storage} was created to {study.direction.name.lower()}; "
                             f"hydra.sweeper.direction={self.direction} needs another study_name")
        return study

    # --- the sweep ------------------------------------------------------------------------------------------
    def _sweep(self, arguments: list[str]) -> None:
        space, keys, fixed = self._space(arguments)
        n_trials = self._check(space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper logs its own lines
        study = self._study(space)
        self._recover(study)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper does
        left = n_trials - len(done_trials(study))
        base_seed = int(self.config.get("seed", 0))
        log.info(f"[optuna] study {self.study_name!r} on {self.storage}: {n_trials - left} of {n_trials} trials done, "
                 f"{max(left, 0)} to run ({self.seeds} seed(s) each, {self.n_jobs} at a time)")
        job_index = 0
        while left > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, left))]
            jobs = [(trial, base_seed + s, s == 0) for trial in trials for s in range(self.seeds)]
            overrides = [[*fixed, *(f"{keys[k]}={override_value(v)}" for k, v in trial.params.items()), f"seed={seed}",
                          f"trial.number={trial.number}", f"trial.study={override_value(self.study_name)}",
                          f"trial.storage={override_value(self.storage)}", f"trial.report={override_value(report)}"]
                         for trial, seed, report in jobs]
            returns = self.launcher.launch(overrides, initial_job_idx=job_index)
            job_index += len(jobs)
            for i, trial in enumerate(trials):
                self._tell(study, trial, [(seed, ret) for (_, seed, _), ret in
                                          zip(jobs[i * self.seeds:(i + 1) * self.seeds], returns[i * self.seeds:])])
            left -= len(trials)
            failed = [t for t in done_trials(study) if t.state == TrialState.FAIL]
            if len(failed) > self.max_failure_rate * n_trials:
                raise SweepError(f"{len(failed)} of the study's {n_trials} trials failed (more than max_failure_rate="
                                 f"{self.max_failure_rate}); the last: {failed[-1].user_attrs.get('error', '?')}")
        self._write_results(study, n_trials)

    def _recover(self, study: optuna.Study) -> None:
        """Trials a killed sweep left RUNNING: FAIL (`interrupted`), and the same parameters asked again.
        A finished trial's user attributes cannot change, and a trial of another process is reached by number
        only through the storage (BaseStorage's public methods: study id by name, trial id by number)."""
        storage = self.storage_backend
        study_id = storage.get_study_id_from_name(study.study_name)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                        "interrupted", True)
            tell(study, t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.info(f"[optuna] trial {t.number} was left running by an interrupted sweep: marked FAIL, asked again")

    def _tell(self, study: optuna.Study, trial: optuna.Trial, results: list) -> None:
        values, dirs, pruned, error = [], [], None, None
        for seed, ret in results:
            out = str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else ""
            dirs.append(out)
            if ret.status == JobStatus.COMPLETED:
                values.append(float(ret.return_value))
                continue
            values.append(None)
            exc = job_error(ret)
            if isinstance(exc, optuna.TrialPruned):
                pruned = str(exc)
            elif isinstance(exc, (UserError, FileNotFoundError)) and not isinstance(exc, RunFailed):  # a bad config: stop
                self._set_attrs(trial, results, values, dirs, error=str(exc))
                tell(study, trial, state=TrialState.FAIL)
                raise SweepError(f"trial {trial.number} (seed {seed}): {exc}")
            else:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (seed {seed}, {out}/error.txt)"
                if out:
                    Path(out, "error.txt").write_text("".join(traceback.format_exception(exc)))
        self._set_attrs(trial, results, values, dirs, error=error)
        if error is not None:
            tell(study, trial, state=TrialState.FAIL)
            log.warning(f"[optuna] trial {trial.number} failed: {error}")
        elif pruned is not None:
            tell(study, trial, state=TrialState.PRUNED)
            log.info(f"[optuna] trial {trial.number} {pruned}")
        elif any(v is None or math.isnan(v) for v in values):
            trial.set_user_attr("error", "the objective is NaN (no validation logged the metric)")
            tell(study, trial, state=TrialState.FAIL)
            log.warning(f"[optuna] trial {trial.number} failed: objective NaN")
        else:
            tell(study, trial, sum(values) / len(values))
            log.info(f"[optuna] trial {trial.number} {trial.params}: {sum(values) / len(values):.4f} (seeds {values})")

    def _set_attrs(self, trial, results, values, dirs, error=None) -> None:
        trial.set_user_attr("seeds", [seed for seed, _ in results])
        trial.set_user_attr("seed_values", values + [None] * (len(results) - len(values)))  # None: not run or failed
        trial.set_user_attr("job_dirs", [os.path.abspath(d) if d else "" for d in dirs])
        if error is not None:
            trial.set_user_attr("error", error)

    def _write_results(self, study: optuna.Study, n_trials: int) -> None:
        trials = done_trials(study)
        states = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                              TrialState.FAIL)}
        results = {"study_name": self.study_name, "storage": self.storage, "direction": self.direction,
                   "n_trials": n_trials, **states}
        if states["complete"]:
            best = study.best_trial
            results |= {"best_value": best.value, "best_trial": best.number, "best_params": dict(best.params),
                        "best_seed_values": best.user_attrs.get("seed_values")}
        out = Path(str(self.config.hydra.sweep.dir))
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), out / "optimization_results.yaml")
        log.info(f"[optuna] {states}; best: {results.get('best_params')} = {results.get('best_value')}; "
                 f"written to {out / 'optimization_results.yaml'}")


def job_error(ret: JobReturn) -> BaseException:
    """The exception a job that did not complete raised, read through `JobReturn.return_value`, Hydra's public
    property, which re-raises it after writing "Error executing job with overrides: ..." to stderr: that line is
    kept out (a pruned trial is no error, and the sweeper reports failed trials itself)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            value = ret.return_value
    except BaseException as e:  # noqa: BLE001 - the job's own exception, whatever it is
        tb = e.__traceback__  # the re-raise put two frames on top of the job's own: this one and the property's
        return e.with_traceback(tb.tb_next.tb_next if tb is not None and tb.tb_next is not None else tb)
    return RuntimeError(f"job status {ret.status.name} with return value {value!r:.100}")


def tell(study: optuna.Study, trial, value=None, state=None) -> None:
    """`study.tell`, outside `optimize`: a GridSampler that has covered its grid calls `study.stop()` after the
    last trial, which Optuna refuses outside `optimize`; the trial is already stored by then, and the sweep
    counts its own trials, so that refusal is dropped."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def done_trials(study: optuna.Study) -> list:
    """The trials that count toward n_trials: finished ones, except those an interrupted sweep left behind."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]
