"""SDAR's self-distillation baselines (ZJU-REAL/SDAR; the math in `stepopsd.algorithms.distill`), each over a base
estimator (`algorithm.base`, GRPO as in SDAR's trainers) and the hindsight teacher every teacher-shaped estimator
shares (`stepopsd.estimators.teacher_shaped`):

rlsd       RLSD: the base advantage reweighted per target token, w_t = clip(exp(sign(A) Δ_t), 1 ± ε_w),
           Â = A ((1 − λ) + λ w_t), λ warmed down linearly from 0.5 to 0 over 100 training steps (SDAR's scripts;
           its code default is 50), ε_w = 0.2. No loss term. With λ = 0 no teacher pass runs: exactly the base.
sdar       SDAR: the base's PPO loss plus c_sd · agg(g_t (log π_T − log π_θ)), g_t = σ(β Δ_t) detached;
           c_sd = 0.01, β = 5 (SDAR's scripts; code default c_sd = 0.1).
opsd       OPSD: that term alone (the PPO surrogate's coefficient 0), β = 5.
grpo_opsd  GRPO+OPSD: GRPO plus the term with β = 0 (a constant gate 1/2), as SDAR's scripts define it.

Where we depart from SDAR's code (docs/estimators.md):
- the teacher's privileged context: by default StepOPSD's hindsight block (outcome, and a successful peer for a failed
  member), inserted before the step's target (Eq. 3), so that every teacher-shaped row of the comparison reads the
  same context; SDAR's own, hand-written skill documents per task type before the prompt, is
  `algorithm.teacher.context=skills algorithm.teacher.skills_dir=<a folder in SDAR's layout>`
  (`stepopsd.hindsight.SkillDocs`);
- the tokens: Δ and the term are taken on the step's target span (`env.target_span`; SDAR: the whole response; the
  two agree under `env.target_span=full_step`);
- the teacher: the live policy at the start of the update (`teacher_refresh: 0`), SDAR's rollout-time π_old; a
  stale snapshot is a knob away.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

import torch

from stepopsd.algorithms.distill import DistillTerm, rlsd_advantages, rlsd_lambda, sdar_gate
from stepopsd.algorithms.stepopsd import token_gap
from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Advantages, Context, register_estimator
from stepopsd.estimators.teacher_shaped import TeacherShaped, TeacherShapedConfig


@dataclass
class RLSDKnobs:
    lam0: float = 0.5  # λ_0
    warmdown_steps: int = 100  # W: λ reaches 0 at training step W (<= 0: constant λ_0)
    eps_w: float = 0.2  # ε_w: w_t in [1 − ε_w, 1 + ε_w]
    teacher_refresh: int = 0  # 0: the live policy (SDAR: the rollout-time π_old); N: a snapshot every N steps
    peer_budget_tokens: int = 512  # the hindsight block's peer budget (conf/algorithm/rlsd.yaml: env.peer_budget_tokens)

    def __post_init__(self):
        if not (0 <= self.lam0 <= 1 and 0 <= self.eps_w < 1 and self.teacher_refresh >= 0 and self.peer_budget_tokens >= 1):
            raise ValueError(f"algorithm.rlsd: need 0 <= lam0 <= 1 (got {self.lam0}), 0 <= eps_w < 1 (got {self.eps_w}), "
                             "teacher_refresh >= 0 and peer_budget_tokens >= 1")


@dataclass
class SDARKnobs:
    coef: float = 0.01  # c_sd
    gate_beta: float = 5.0  # β (0: the constant gate 1/2 of GRPO+OPSD)
    pg_coef: float = 1.0  # the PPO surrogate's coefficient (0: OPSD alone)
    teacher_refresh: int = 0
    peer_budget_tokens: int = 512

    def __post_init__(self):
        if not (self.coef >= 0 and self.gate_beta >= 0 and self.pg_coef >= 0 and self.teacher_refresh >= 0
                and self.peer_budget_tokens >= 1) or self.coef == self.pg_coef == 0:
            raise ValueError(f"algorithm.sdar: need coef, gate_beta, pg_coef, teacher_refresh >= 0 (not coef = pg_coef "
                             f"= 0: nothing to train), peer_budget_tokens >= 1; got coef={self.coef}, "
                             f"gate_beta={self.gate_beta}, pg_coef={self.pg_coef}")


@dataclass
class RLSDConfig(TeacherShapedConfig):
    rlsd: RLSDKnobs = field(default_factory=RLSDKnobs)


@dataclass
class SDARConfig(TeacherShapedConfig):
    sdar: SDARKnobs = field(default_factory=SDARKnobs)


@dataclass
class OPSDConfig(SDARConfig):
    sdar: SDARKnobs = field(default_factory=lambda: SDARKnobs(pg_coef=0.0))


@dataclass
class GRPOOPSDConfig(SDARConfig):
    sdar: SDARKnobs = field(default_factory=lambda: SDARKnobs(gate_beta=0.0))


def targets(batch: RolloutBatch) -> torch.Tensor:
    """[N, L] bool: the tokens of each step's target span inside the loss mask."""
    return (batch.step_ids >= 0) & (batch.loss_mask > 0)


@register_estimator("rlsd")
class RLSD(TeacherShaped):
    config = RLSDConfig

    @classmethod
    def knobs_from(cls, algorithm: Mapping) -> RLSDKnobs:
        return RLSDKnobs(**algorithm.get("rlsd", {}))

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        base = self.base.advantages(batch, ctx)
        k = self.knobs
        lam = rlsd_lambda(ctx.step + 1, k.lam0, k.warmdown_steps)
        if lam == 0.0:  # exactly the base: no teacher pass
            return Advantages(base.tokens, base.trajectories, base.metrics | {"rlsd/lambda": 0.0})
        target = targets(batch)
        teacher, _, metrics = self.with_teacher(ctx, lambda t: self.teacher_logprobs(batch, t, k.peer_budget_tokens))
        metrics["rlsd/lambda"] = lam
        if teacher is None:
            return Advantages(base.tokens, base.trajectories, base.metrics | metrics)
        delta = token_gap(teacher, batch.rollout_logp, target)  # with the rollout's (old) student log-probs
        shaped = rlsd_advantages(base.tokens, delta, target, lam=lam, eps_w=k.eps_w)
        metrics["rlsd/delta_mean"] = delta[target].mean().item() if target.any() else 0.0
        moved = target & (base.tokens != 0)
        metrics["rlsd/weight_dev"] = (shaped[moved] / base.tokens[moved] - 1).abs().mean().item() if moved.any() else 0.0
        return Advantages(shaped, base.trajectories, base.metrics | metrics)


@register_estimator("sdar")
class SDAR(TeacherShaped):
    config = SDARConfig

    @classmethod
    def knobs_from(cls, algorithm: Mapping) -> SDARKnobs:
        defaults = dataclasses.asdict(cls.config().sdar)  # opsd / grpo_opsd: their own defaults
        return SDARKnobs(**(defaults | dict(algorithm.get("sdar", {}))))

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        base = self.base.advantages(batch, ctx)
        k = self.knobs
        target = targets(batch)
        teacher, _, metrics = self.with_teacher(ctx, lambda t: self.teacher_logprobs(batch, t, k.peer_budget_tokens))
        if teacher is None:  # this batch: the base's PPO loss alone (pg_coef 1), as every teacher-shaped fallback
            return Advantages(base.tokens, base.trajectories, base.metrics | metrics)
        delta = token_gap(teacher, batch.rollout_logp, target)
        gate = sdar_gate(teacher, batch.rollout_logp, k.gate_beta)[target]
        metrics |= {f"{self.name}/delta_mean": delta[target].mean().item() if target.any() else 0.0,
                    f"{self.name}/gate_mean": gate.mean().item() if gate.numel() else 0.0,
                    f"{self.name}/gate_active_frac": (gate > 0.5).float().mean().item() if gate.numel() else 0.0}
        return Advantages(base.tokens, base.trajectories, base.metrics | metrics, teacher_logp=teacher,
                          distill=DistillTerm(k.coef, k.gate_beta, k.pg_coef))


@register_estimator("opsd")
class OPSD(SDAR):
    config = OPSDConfig


@register_estimator("grpo_opsd")
class GRPOOPSD(SDAR):
    config = GRPOOPSDConfig

