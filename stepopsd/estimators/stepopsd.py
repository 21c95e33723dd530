"""StepOPSD as an estimator: the base estimator's advantages (`algorithm.base`, GRPO by default) reshaped per step
by the hindsight teacher (spec §6-10, Eq. 2-12; the math in `stepopsd.algorithms.stepopsd`, the teacher passes
in `stepopsd.teacher.rescore`).

State: the stale teacher snapshot (refreshed every `teacher_refresh` training steps, or the live policy with 0),
saved with checkpoints; its clock is the training step the advantage stage passes (`ctx.step`, t of Eq. 9). With lambda_t = 0 the base advantages
pass through untouched: exactly the base estimator. A batch whose rescoring fails (a hindsight context longer than
the teacher allows, out of memory) trains on the base advantages, with a warning, counted in
`stepopsd/rescoring_failed`; under several ranks a failure on any rank makes every rank fall back for that batch
(the same decision and the same logged keys everywhere, `stepopsd.ranks`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

from stepopsd import ranks
from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Advantages, Context, Estimator, Services, build_estimator, register_estimator
from stepopsd.estimators.outcome import GRPOConfig
from stepopsd.faults import maybe_kill
from stepopsd.hindsight import alfworld_peer_lines
from stepopsd.teacher import TeacherSnapshot, rescore

log = logging.getLogger(__name__)


@dataclass
class StepOPSDAlgorithm(GRPOConfig):
    base: str = "grpo"  # the estimator whose advantages the teacher reshapes: grpo (spec), drgrpo, rloo, ...
    stepopsd: StepOPSDConfig = field(default_factory=StepOPSDConfig)  # spec §6-12 (target_span and peer_budget_tokens
    # follow env.target_span and env.peer_budget_tokens, the environment's protocol: conf/algorithm/stepopsd.yaml)


@register_estimator("stepopsd")
class StepOPSD(Estimator):
    config = StepOPSDAlgorithm

    def __init__(self, config: StepOPSDConfig, base: Estimator, *, micro_batch: int = 8):
        if micro_batch < 1:
            raise ValueError(f"algorithm.teacher.micro_batch_rows={micro_batch}: need >= 1")
        self.config = config
        self.base = base
        self.micro_batch = micro_batch  # hindsight-context rows per teacher forward pass
        self.services = Services()
        self.teacher: TeacherSnapshot | None = None

    @classmethod
    def from_config(cls, algorithm: Mapping) -> "StepOPSD":
        base = algorithm.get("base", "grpo")
        if base == "stepopsd":
            raise ValueError("algorithm.base=stepopsd: StepOPSD reshapes another estimator's advantages; use grpo, rloo, ...")
        return cls(StepOPSDConfig(**algorithm["stepopsd"]), build_estimator({**algorithm, "name": base}),
                   micro_batch=algorithm.get("teacher", {}).get("micro_batch_rows", 8))

    def setup(self, policy, services: Services) -> None:
        self.services = services
        self.base.setup(policy, services)
        if self.teacher is None:
            self.teacher = TeacherSnapshot(policy, self.config.teacher_refresh, services.frozen_dtype)

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        base = self.base.advantages(batch, ctx)
        t0, step = time.perf_counter(), ctx.step  # training steps done: t of Eq. 9 and the N_ref clock
        refreshed = self.teacher.maybe_refresh(ctx.policy, step)
        teacher = self.teacher.model.to(ctx.device)
        live = teacher is ctx.policy  # teacher_refresh=0: under FSDP the live policy's weights are gathered
        s = self.services
        error = None
        try:
            with ctx.compute(), ctx.full_weights() if live else contextlib.nullcontext():
                shaped, metrics = rescore(dataclasses.replace(batch, advantages=base.tokens), teacher, s.tokenizer,
                                          self.config, step, pad_id=s.tokenizer.pad_token_id,
                                          temperature=s.temperature, micro_batch=self.micro_batch,
                                          peer_lines=s.peer_lines or alfworld_peer_lines)
            maybe_kill("rescore", step + 1)  # tests only (STEPOPSD_TEST_KILL_AT)
        except Exception as e:  # a context too long for the teacher, out of memory, ...: this batch keeps the base's
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        error = ranks.agreed_problem(error)  # one rank's failure: every rank's share of the batch falls back together
        if error is None:
            metrics["stepopsd/rescoring_failed"] = 0.0
        else:
            log.warning("[stepopsd] teacher rescoring failed at training step %d (%s): this batch trains on "
                        "plain %s advantages", step + 1, error, self.base.name.upper())
            shaped, metrics = base.tokens, {"stepopsd/rescoring_failed": 1.0, "stepopsd/lambda": self.config.lam(step)}
        metrics |= {"time/rescore_s": time.perf_counter() - t0, "stepopsd/teacher_refreshed": float(refreshed),
                    "stepopsd/teacher_age": step - self.teacher.taken_at}
        return Advantages(shaped, base.trajectories, base.metrics | metrics)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher else None}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])

