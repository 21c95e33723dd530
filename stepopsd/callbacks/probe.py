"""The credit probe during training (`probe.every` > 0): every N training steps, after the update, the Monte-Carlo
credit probe (`stepopsd.probe`) runs with the current policy on `probe.tasks` tasks of the first validation split,
and its metrics (`probe/<estimator>/spearman`, `.../sign_agreement`, `.../pivotal_share`, ..., `time/probe_s`) are
logged at that training step. Each rank probes with its own seed; the logged values are rank 0's. Its cost is
`probe.steps` x 2 x `probe.continuations` episodes per probe (`time/probe_s`)."""
from __future__ import annotations

import contextlib
import dataclasses

import lightning as L

from stepopsd.estimators import Context, Services
from stepopsd.probe import ProbeConfig, probe
from stepopsd.rollout import RolloutConfig


class CreditProbe(L.Callback):
    def __init__(self, knobs: ProbeConfig, tasks, estimators: dict, services: Services, rollout_cfg: RolloutConfig,
                 exact=None):
        if knobs.every < 1:
            raise ValueError(f"probe.every={knobs.every}: the callback runs every N >= 1 training steps")
        self.knobs, self.tasks, self.estimators = knobs, list(tasks), estimators
        self.services, self.rollout_cfg, self.exact = services, rollout_cfg, exact

    def setup(self, trainer, pl_module, stage: str) -> None:
        for estimator in self.estimators.values():
            estimator.setup(pl_module.policy, self.services)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        step = trainer.current_epoch + 1  # training steps done
        if step % self.knobs.every:
            return
        dm = trainer.datamodule
        ctx = Context(step=step, policy=pl_module.policy, device=pl_module.device,
                      compute=trainer.precision_plugin.forward_context,
                      full_weights=getattr(pl_module, "full_weights", contextlib.nullcontext))
        knobs = dataclasses.replace(self.knobs, seed=self.knobs.seed + 1009 * step + trainer.global_rank)
        with dm.generation(trainer) as backend:
            result = probe(dm.env, backend, dm.tokenizer, self.tasks, self.rollout_cfg, self.estimators, knobs,
                           ctx=ctx, exact=self.exact)
        if trainer.logger is not None:
            trainer.logger.log_metrics(result.metrics, step=step)
