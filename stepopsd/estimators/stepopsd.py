"""StepOPSD as an estimator: the base estimator's advantages (`algorithm.base`, GRPO by default) reshaped per step
by the hindsight teacher (spec §6-10, Eq. 2-12; the math in `stepopsd.algorithms.stepopsd`, the teacher passes
in `stepopsd.teacher.rescore`).

State: the stale teacher snapshot (refreshed every `teacher_refresh` training steps, or the live policy with 0),
saved with checkpoints; its clock is the training step the advantage stage passes (`ctx.step`, t of Eq. 9). With
lambda_t = 0 the base advantages pass through untouched: exactly the base estimator. Over a step-level base (GiGPO,
`Estimator.step_level`) the per-step budget (Eq. 10-12) equalises the teacher's multiplier |Ã / A| across steps,
not |Ã|, so that the base's own step-to-step credit is kept (`shape_advantages`, `budget_on`). The teacher, its state and the
fall-back to the base's advantages when a teacher pass fails are every teacher-shaped estimator's
(`stepopsd.estimators.teacher_shaped`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Advantages, Context, register_estimator
from stepopsd.estimators.teacher_shaped import TeacherShaped, TeacherShapedConfig
from stepopsd.hindsight import alfworld_peer_lines
from stepopsd.teacher import rescore


@dataclass
class StepOPSDAlgorithm(TeacherShapedConfig):  # base: grpo (the spec), drgrpo, rloo, gigpo
    stepopsd: StepOPSDConfig = field(default_factory=StepOPSDConfig)  # spec §6-12 (target_span and peer_budget_tokens
    # follow env.target_span and env.peer_budget_tokens, the environment's protocol: conf/algorithm/stepopsd.yaml)


@register_estimator("stepopsd")
class StepOPSD(TeacherShaped):
    config = StepOPSDAlgorithm

    @classmethod
    def knobs_from(cls, algorithm: Mapping) -> StepOPSDConfig:
        return StepOPSDConfig(**algorithm["stepopsd"])

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        base = self.base.advantages(batch, ctx)
        s, step = self.services, ctx.step  # training steps done: t of Eq. 9 and the N_ref clock
        scored, _, metrics = self.with_teacher(ctx, lambda teacher: rescore(
            dataclasses.replace(batch, advantages=base.tokens), teacher, s.tokenizer, self.knobs, step,
            pad_id=s.tokenizer.pad_token_id, temperature=s.temperature, micro_batch=self.micro_batch,
            peer_lines=s.peer_lines or alfworld_peer_lines,
            budget_on="multiplier" if self.base.step_level else "advantage",
            context=self.skill_context if self.skills is not None else None))  # None: hindsight (Eq. 3)
        if scored is None:
            return Advantages(base.tokens, base.trajectories, base.metrics | metrics | {"stepopsd/lambda": self.knobs.lam(step)})
        shaped, shaping = scored
        return Advantages(shaped, base.trajectories, base.metrics | shaping | metrics)

