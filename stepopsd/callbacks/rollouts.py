"""Callbacks around rollouts: attach generation to the trained policy, log rollout metrics, and
evaluate success on validation games (temperature 0.4, `samples` rollouts per game) at the start, every
`every` training steps and at the end. Validation tasks come in named splits (ALFWorld: valid_seen and
valid_unseen; Search-QA: test), rolled out together and counted per split and task type:
`val/<split>/success` and `val/<split>/success_<type>` (Search-QA: `em`, per data source); a run on
generated data says so in every metric name's prefix (`val_generated/<split>/...`)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import lightning as L
import torch

from stepopsd.callbacks.progress import PlainProgressBar
from stepopsd.rollout import RolloutConfig, rollout
from stepopsd.types import Task


def metric_prefix(tasks: list[Task]) -> str:
    """`val` on official data, `val_<label>` (`val_generated`) otherwise: the label stays in every name."""
    label = "+".join(sorted({t.data_label for t in tasks}))
    return "val" if label == "official" else f"val_{label}"


class RolloutLogging(L.Callback):
    """Points the datamodule's generation at the policy and logs what each rollout measured."""

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.datamodule.attach(pl_module.policy, getattr(pl_module, "full_weights", None))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        metrics = dict(trainer.datamodule.last_metrics)
        bar = {k: metrics.pop(k) for k in ("success/rate", "reward/mean", "time/rollout_s") if k in metrics}
        pl_module.log_dict(metrics, on_step=True, sync_dist=True, batch_size=batch.num_rows)
        pl_module.log_dict(bar, on_step=True, sync_dist=True, batch_size=batch.num_rows, prog_bar=True)
        # summed over ranks: every rank rolls out its own whole groups
        pl_module.log("rollout/episodes", float(len(batch.trajectories)), on_step=True, sync_dist=True,
                      reduce_fx="sum", batch_size=batch.num_rows)


class RolloutValidation(L.Callback):
    """Validation success on each split at the start, every `every` training steps (one training step
    is one Lightning epoch: one rollout batch and its PPO update) and at the end.

    `histories[split]` holds (training step, overall success) per evaluation; `history` is the FIRST
    split's, the run's default metric. `records` holds (training step, every metric logged) per evaluation,
    from which `train` computes the objective a sweeper optimises. `report(step, metrics)`, when given, is
    called after each evaluation (a sweep trial's pruning reporter); when it returns True training stops
    after this step."""

    def __init__(self, splits: dict[str, list[Task]], rollout_cfg: RolloutConfig, *, every: int, temperature: float = 0.4,
                 samples: int = 1, seed: int = 0, metric: str = "success",
                 report: Callable[[int, dict], bool] | None = None):
        if not splits or not all(splits.values()):
            raise ValueError(f"validation needs one or more splits, each with tasks: got {[(k, len(v)) for k, v in splits.items()]}")
        self.splits = dict(splits)
        self.tasks = [t for tasks in self.splits.values() for t in tasks]  # all splits in one rollout
        self.split_of = [name for name, tasks in self.splits.items() for _ in tasks]
        self.cfg = dataclasses.replace(rollout_cfg, group_size=samples,
                                       sampling=dataclasses.replace(rollout_cfg.sampling, temperature=temperature))
        self.every, self.seed = every, seed
        self.metric = metric  # "success" (ALFWorld) or "em" (Search-QA: success = exact match = 1)
        self.histories: dict[str, list[tuple[int, float]]] = {name: [] for name in self.splits}
        self.records: list[tuple[int, dict[str, float]]] = []
        self.report = report

    @property
    def history(self) -> list[tuple[int, float]]:
        """(training step, overall success) on the first split."""
        return self.histories[next(iter(self.splits))]

    @property
    def prefix(self) -> str:
        return metric_prefix(self.tasks)

    def evaluate(self, trainer, pl_module, step: int) -> float:
        dm = trainer.datamodule
        rank, world = trainer.global_rank, trainer.world_size
        mine, mine_split = self.tasks[rank::world], self.split_of[rank::world]
        names = list(self.splits)
        types = sorted({t.task_type for t in self.tasks})
        won, seen = torch.zeros(len(names), len(types)), torch.zeros(len(names), len(types))
        bar = getattr(trainer, "progress_bar_callback", None)
        bar = bar if isinstance(bar, PlainProgressBar) else None
        if bar is not None:  # batch logs: a line at the start and the end
            bar.validation_start(step, {name: len(tasks) for name, tasks in self.splits.items()}, self.cfg.group_size)
        # as training rollouts (`RolloutDataModule.generation`): the trainer's compute precision, the current
        # weights; under FSDP the full weights are gathered by every rank, also one without validation tasks
        with dm.generation(trainer) as backend:
            trajectories = rollout(dm.env, backend, dm.tokenizer, mine, self.cfg, seed=self.seed + rank)[0] if mine else []
        for t in trajectories:  # t.group indexes `mine`
            i, j = names.index(mine_split[t.group]), types.index(t.task.task_type)
            won[i, j] += t.success
            seen[i, j] += 1
        counts = trainer.strategy.reduce(torch.stack([won, seen]).to(pl_module.device), reduce_op="sum").cpu()
        won, seen = counts[0], counts[1]
        metrics = {}
        for i, name in enumerate(names):
            success = (won[i].sum() / seen[i].sum().clamp(min=1)).item()
            metrics[f"{self.prefix}/{name}/{self.metric}"] = success
            metrics |= {f"{self.prefix}/{name}/{self.metric}_{kind}": (won[i, j] / seen[i, j]).item()
                        for j, kind in enumerate(types) if seen[i, j] > 0}
            self.histories[name].append((step, success))
        self.records.append((step, metrics))
        if bar is not None:
            bar.validation_end(step, [f"{name} {self.metric} {self.histories[name][-1][1]:.3f} "
                                      f"({won[i].sum():.0f}/{seen[i].sum():.0f})" for i, name in enumerate(names)])
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        if self.report is not None and self.report(step, metrics):
            trainer.should_stop = True
        return self.history[-1][1]

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:  # not again when resuming
            self.evaluate(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        step = trainer.current_epoch + 1
        if self.every and step % self.every == 0 and step < trainer.max_epochs:
            self.evaluate(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.history or self.history[-1][0] != trainer.current_epoch:
            self.evaluate(trainer, pl_module, trainer.current_epoch)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "histories": {k: list(v) for k, v in self.histories.items()},
                "records": list(self.records)}

    def load_state_dict(self, state_dict: dict) -> None:
        # checkpoints from before validation splits hold only the first split's `history`
        saved = state_dict.get("histories") or {next(iter(self.splits)): state_dict["history"]}
        for name in self.splits:
            self.histories[name] = [tuple(h) for h in saved.get(name, [])]
        self.records = [(step, dict(m)) for step, m in state_dict.get("records", [])]
