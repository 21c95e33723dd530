"""AdvantageStage: the one stage of the training step that computes the advantages, with the configured estimator.

On every training batch, before `training_step`, it calls `estimator.advantages(batch, ctx)` (stepopsd/estimators)
and writes the result into the batch (`advantages`, `traj_adv` for outcome-level estimators, and an estimator's
own loss term, `teacher_logp` / `distill`): the only write
to a batch after `build_batch`, so no other callback's position matters. The estimator's metrics are logged on
the step (reduced across ranks). Its state (StepOPSD: the teacher snapshot and its clock) is this callback's
checkpoint state, with the estimator's name. StepOPSD's is saved under the key of the former TeacherRescoring
callback, in the same layout, so checkpoints from before the estimator registry resume (and Lightning does not ask
for a callback that no longer exists).
"""
from __future__ import annotations

import contextlib

import lightning as L

from stepopsd.checkpoints import LEGACY_STATE_KEY
from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Context, Estimator, Services


class AdvantageStage(L.Callback):
    def __init__(self, estimator: Estimator, services: Services | None = None):
        self.estimator = estimator
        self.services = services or Services()
        self.step = 0  # training steps done (the estimators' t, the clock of StepOPSD's lambda and teacher)
        self._pending: dict | None = None

    @property
    def state_key(self) -> str:
        """Where Lightning keeps this callback's state in a checkpoint: StepOPSD's under the former callback's key."""
        return LEGACY_STATE_KEY if self.estimator.name == "stepopsd" else type(self).__name__

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.estimator.setup(pl_module.policy, self.services)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning restores callback state after `setup`: a resumed run's estimator state lands here
        if self._pending is not None:
            self.estimator.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch: RolloutBatch, batch_idx: int) -> None:
        ctx = Context(step=self.step, policy=pl_module.policy, device=pl_module.device,
                      compute=trainer.precision_plugin.forward_context,
                      full_weights=getattr(pl_module, "full_weights", contextlib.nullcontext))
        out = self.estimator.advantages(batch, ctx)
        batch.advantages = out.tokens  # the documented write-back: training_step reads these
        if out.trajectories is not None:
            batch.traj_adv = out.trajectories
        batch.teacher_logp, batch.distill = out.teacher_logp, out.distill  # a loss term of the estimator's, or None
        if out.metrics:
            pl_module.log_dict(out.metrics, on_step=True, sync_dist=True, batch_size=batch.num_rows)
        self.step += 1

    def state_dict(self) -> dict:
        """{estimator, step, the estimator's state}: for StepOPSD the layout TeacherRescoring saved plus the name."""
        return {"estimator": self.estimator.name, "step": self.step, **self.estimator.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        state.pop("estimator", None)  # absent in a legacy TeacherRescoring state (always StepOPSD's)
        self.step = state.pop("step", 0)
        self._pending = state

