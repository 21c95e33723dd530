"""TeacherRescoring: the Lightning callback that injects StepOPSD's step-aware advantages.

On every training batch, before `training_step`, it rescores the batch's target tokens with the
hindsight teacher (Eq. 2-5) and replaces the GRPO advantages with the shaped ones (Eq. 6-12);
the teacher snapshot is refreshed every N_ref training steps and saved with checkpoints. Without
this callback (`algorithm=grpo`), or with lambda_t = 0, training is exactly GRPO. A batch whose rescoring
fails (a hindsight context longer than the teacher allows, out of memory) trains on its plain GRPO
advantages, with a warning, counted in `stepopsd/rescoring_failed`; under several ranks a failure on any rank
makes every rank fall back for that batch (the same decision and the same logged keys on every rank).
"""
from __future__ import annotations

import contextlib
import logging
import time

import lightning as L

from stepopsd import ranks
from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.data.batch import RolloutBatch
from stepopsd.faults import maybe_kill
from stepopsd.hindsight import alfworld_peer_lines
from stepopsd.teacher import TeacherSnapshot, rescore

log = logging.getLogger(__name__)


class TeacherRescoring(L.Callback):
    def __init__(self, config: StepOPSDConfig, tokenizer, *, temperature: float = 1.0, micro_batch: int = 16,
                 peer_lines=alfworld_peer_lines, dtype=None):
        self.config = config
        self.peer_lines = peer_lines  # the environment's peer serialisation (spec §6)
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.micro_batch = micro_batch  # teacher rows per forward pass
        self.dtype = dtype  # the snapshot's dtype (None: the policy's)
        self.teacher: TeacherSnapshot | None = None
        self._pending_state: dict | None = None
        self.step = 0  # training steps (rollout batches) seen: t of Eq. 9 and the N_ref clock

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.teacher is None:
            self.teacher = TeacherSnapshot(pl_module.policy, self.config.teacher_refresh, self.dtype)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning restores callback state after `setup`: a resumed run's teacher and clock land here
        if self._pending_state is not None:
            self.teacher.load_state_dict(self._pending_state["teacher"])
            self.step = self._pending_state["step"]
            self._pending_state = None

    def on_train_batch_start(self, trainer, pl_module, batch: RolloutBatch, batch_idx: int) -> None:
        t0 = time.perf_counter()
        refreshed = self.teacher.maybe_refresh(pl_module.policy, self.step)
        teacher = self.teacher.model.to(pl_module.device)
        live = teacher is pl_module.policy and hasattr(pl_module, "full_weights")  # teacher_refresh=0
        error = None
        try:
            with trainer.precision_plugin.forward_context(), pl_module.full_weights() if live else contextlib.nullcontext():
                # the trainer's compute precision (bf16-mixed: autocast); a live-policy teacher under FSDP: full weights
                shaped, metrics = rescore(batch, teacher, self.tokenizer, self.config, self.step,
                                          pad_id=self.tokenizer.pad_token_id, temperature=self.temperature,
                                          micro_batch=self.micro_batch, peer_lines=self.peer_lines)
            maybe_kill("rescore", self.step + 1)  # tests only (STEPOPSD_TEST_KILL_AT)
        except Exception as e:  # a context too long for the teacher, out of memory, ...: this batch is plain GRPO
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        error = ranks.agreed_problem(error)  # one rank's failure: every rank's share of the batch falls back together
        if error is None:
            batch.advantages = shaped  # the documented write-back: training_step reads the shaped values
            metrics["stepopsd/rescoring_failed"] = 0.0
        else:
            log.warning("[stepopsd] teacher rescoring failed at training step %d (%s): this batch trains on "
                        "plain GRPO advantages", self.step + 1, error)
            metrics = {"stepopsd/rescoring_failed": 1.0, "stepopsd/lambda": self.config.lam(self.step)}
        metrics |= {"time/rescore_s": time.perf_counter() - t0, "stepopsd/teacher_refreshed": float(refreshed),
                    "stepopsd/teacher_age": self.step - self.teacher.taken_at}
        pl_module.log_dict(metrics, on_step=True, sync_dist=True, batch_size=batch.num_rows)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "teacher": self.teacher.state_dict() if self.teacher else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_state = state_dict
