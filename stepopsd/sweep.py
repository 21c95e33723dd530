"""Optuna pieces shared by the sweeper (`hydra_plugins/stepopsd_optuna`) and the trial jobs it launches.

A sweep (`python train.py -m hparams_search=two_knob ...`) is an Optuna study on a storage that outlives the
sweep (SQLite by default, a journal file across nodes). Each trial runs `seeds_per_trial` jobs of `train.py`;
every job gets `trial.number`, `trial.study` and `trial.storage` as overrides, and the job of the trial's first
seed (`trial.report=true`) reports the objective's metric at every validation after step 0 to the trial and
stops early when the study's pruner says so (`TrialReporter`). `objective` is what `train()` returns: the
mean of the last K values of a named validation metric.
"""
from __future__ import annotations

import os

import optuna


def open_storage(url: str):
    """An Optuna storage from a URL: `sqlite:///path.db` (parent folder created), `journal:///path.log`
    (a JournalStorage on a file: several processes / nodes on a shared filesystem), or another database URL
    Optuna's RDB storage takes (`postgresql://...`, `mysql://...`)."""
    if url.startswith("journal:///"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:///"):]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])), exist_ok=True)
        return url
    if "://" in url:
        return url
    raise ValueError(f"storage={url!r}: use sqlite:///<path>.db, journal:///<path>.log or a database URL")


def metric_name(metric: str | None, prefix: str, splits: list[str], default: str) -> str:
    """The logged name of the objective's metric: `metric` as logged (`val_generated/valid_seen/success`) or
    after the data's prefix (`valid_seen/success`); None = the first split's `default` (success / em)."""
    if metric is None:
        return f"{prefix}/{splits[0]}/{default}"
    return metric if metric.startswith(("val/", "val_")) else f"{prefix}/{metric}"


def check_metric(name: str, prefix: str, splits: list[str], metric: str, types: list[str]) -> str | None:
    """None when validation will log `name`, else a one-line reason with the names it will log."""
    known = {f"{prefix}/{s}/{metric}{suffix}" for s in splits for suffix in ["", *(f"_{t}" for t in types)]}
    if name in known:
        return None
    other = "val_generated" if prefix == "val" else "val"
    hint = (f" (this run's data logs {prefix}/..., not {other}/...)" if name.startswith(f"{other}/") else "")
    return (f"optimized_metric: validation logs no {name!r}{hint}; use one of {', '.join(sorted(known)[:4])}"
            f"{', ...' if len(known) > 4 else ''} (or the part after {prefix}/)")


def objective(records: list[tuple[int, dict[str, float]]], name: str, last_k: int) -> float:
    """Mean of the last `last_k` values of `name` over the validations `records` ((step, metrics) each)."""
    values = [m[name] for _, m in records if name in m]
    return float(sum(values[-last_k:]) / len(values[-last_k:])) if values else float("nan")


class TrialReporter:
    """The job's side of pruning: reports `name` at each validation (step >= 1) to the trial and, when the
    study's pruner says so, asks training to stop (`pruned` holds the step); `train()` then raises
    `optuna.TrialPruned`, which the sweeper records as PRUNED."""

    def __init__(self, storage: str, study: str, number: int, name: str, pruner=None):
        self.name, self.pruned = name, None
        store = open_storage(storage)
        if isinstance(store, str):  # a database URL: the storage object itself, for its public lookups
            store = optuna.storages.RDBStorage(store)
        study_ = optuna.load_study(study_name=study, storage=store, pruner=pruner)
        trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study), number)
        self.trial = optuna.trial.Trial(study_, trial_id)

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        """Report one validation; True when the trial should stop here."""
        if step < 1 or self.name not in metrics:  # step 0 is the same untrained policy in every trial
            return False
        self.trial.report(metrics[self.name], step)
        if self.trial.should_prune():
            self.pruned = step
        return self.pruned is not None


def trial_reporter(trial, name: str) -> TrialReporter | None:
    """The reporter for a job launched by the sweeper (`trial` = the config's `trial` node), with the
    sweeper's pruner (`hydra.sweeper.pruner`); None outside a sweep or for seeds that do not report."""
    if trial is None or trial.get("number") is None or not trial.get("report"):
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    pruner_cfg = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    return TrialReporter(trial.storage, trial.study, int(trial.number), name,
                         pruner=instantiate(pruner_cfg) if pruner_cfg else None)
