"""Self-distillation baselines of SDAR's suite (ZJU-REAL/SDAR): the math, pure tensor functions.

Every quantity is per token of a step's target span, from two log-probs of the SAMPLED token (no distribution over
the vocabulary anywhere, as in SDAR's trainers): the student's and the hindsight-conditioned teacher's,

    Δ_t = log π_T(y_t | c^T, y_<t) − log π_S(y_t | x, y_<t)                                       (Eq. 4's gap)

RLSD (Self-Distilled RLVR; SDAR's `rlsd_utils.compute_rlsd_token_advantage`) reweights the base advantage token by
token; nothing is added to the loss:

    w_t  = clip(exp(sign(A) · Δ_t), 1 − ε_w, 1 + ε_w)          Δ_t with the rollout's (old) student log-prob
    Â_t  = A · ((1 − λ_k) + λ_k · w_t)
    λ_k  = λ_0 · (1 − k / W) for k < W, else 0                  k = training step, counted from 1

SDAR's gated self-distillation (`sdar_utils.compute_sdar_loss`) adds a loss term to the PPO loss; its gradient flows
through the live student log-prob only, the teacher enters through a detached sigmoid gate:

    g_t     = sg(σ(β · (log π_T − sg(log π_θ))))
    ℓ_t     = g_t · (log π_T(y_t) − log π_θ(y_t))               ∇ℓ_t = −g_t ∇ log π_θ(y_t)
    L       = c_pg · L_PPO + c_sd · agg(ℓ)                     agg: the PPO loss's own aggregation (Eq. 14)

OPSD is that term alone (c_pg = 0, β = 5); GRPO+OPSD is GRPO plus the term with β = 0, a constant gate of 1/2:
SDAR's scripts define it so, and with β = 0 the teacher has no effect on the gradient (−½ ∇ log π_θ of the
sampled tokens: a likelihood push on the policy's own samples). That is the reference's baseline as published; it
is kept as such, and named in docs/estimators.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def rlsd_lambda(step: int, lam0: float, warmdown_steps: int) -> float:
    """λ_k of RLSD at training step k = `step` (counted from 1, as SDAR's `global_steps`): a linear warm-down from
    λ_0 to 0 over `warmdown_steps` steps; `warmdown_steps` <= 0: constant λ_0."""
    if warmdown_steps <= 0:
        return lam0
    return lam0 * (1.0 - step / warmdown_steps) if step < warmdown_steps else 0.0


def rlsd_weights(advantages: torch.Tensor, delta: torch.Tensor, eps_w: float) -> torch.Tensor:
    """w_t = clip(exp(sign(A_t) Δ_t), 1 − ε_w, 1 + ε_w), elementwise ([N, L]); A = 0 gives w = 1."""
    return torch.exp(torch.sign(advantages) * delta).clamp(1.0 - eps_w, 1.0 + eps_w)


def rlsd_advantages(advantages: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, *, lam: float,
                    eps_w: float) -> torch.Tensor:
    """Â_t = A_t ((1 − λ) + λ w_t) on the target tokens (`target` [N, L] bool), A_t elsewhere."""
    w = rlsd_weights(advantages, delta, eps_w)
    shaped = advantages * ((1.0 - lam) + lam * w)
    return torch.where(target, shaped, advantages)


def sdar_gate(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """g_t = σ(β (log π_T − log π_S)), detached (β = 0: 1/2 everywhere)."""
    return torch.sigmoid(beta * (teacher_logp - student_logp.detach())).detach()


def sdar_token_loss(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """ℓ_t = g_t (log π_T − log π_θ) per token; its gradient is −g_t ∇ log π_θ (the teacher is detached)."""
    return sdar_gate(teacher_logp, student_logp, beta) * (teacher_logp.detach() - student_logp)


@dataclass(frozen=True)
class DistillTerm:
    """A loss term an estimator adds to the PPO update (written into the batch by the advantage stage):
    L = pg_coef · L_PPO + coef · agg(g_t (log π_T − log π_θ)) over the target tokens."""

    coef: float  # c_sd
    gate_beta: float  # β of the gate (0: constant 1/2)
    pg_coef: float = 1.0  # c_pg: 0 for OPSD alone
