"""StepOPSD advantage shaping: token gap (Eq. 4-5), sign-preserving weight (Eq. 6-9) and the
normalised per-step credit budget (Eq. 10-12).

Pure tensor functions; the teacher only ever acts through the advantage (no distillation loss).
Shapes: B = rows, T = tokens per row. `step_ids[B, T]` holds the step index k >= 0 on the tokens
of a target span Z_k and -1 on every other token (prompt padding, reasoning outside the span in
`action_only` mode, observations, padding).

Layouts. Single-row: one row holds a whole trajectory, its steps numbered k = 0, 1, ... Step-per-row
(ALFWorld): each row is one env step; `traj_ids[B]` says which trajectory a row belongs to.

Choices and simplifications:
* A step is "(trajectory, k)" in the spec. Rows never share a step in either layout, so the key
  used is (row, k), grouped into trajectories by `traj_ids`. It equals (trajectory, k) whenever
  k numbers the steps of a trajectory, and it stays right when a step-per-row caller labels every
  row's span k = 0 (a (trajectory, k) key would merge all its steps into one and silently switch
  the budget off).
* The weight factor of Eq. 8 is computed as 1 + lam*(w - 1), algebraically equal to
  (1 - lam) + lam*w but exactly 1 when w = 1, so Delta = 0 gives A~ = A bitwise.
* lam == 0 short-circuits: the input advantages come back unchanged (a bitwise copy), the budget
  of Eq. 10-12 included. Spec §2: with lam_mix = 0 (or the teacher disabled) the update must be
  exactly GRPO; without the short-circuit the budget could still rescale steps by kappa ~ 1 +- 1e-6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

WEIGHT_FNS = ("sigmoid", "exp")
TARGET_SPAN_MODES = ("action_only", "clean_step_no_observation", "full_step")
_BUDGET_EPS = 1e-6  # Eq. 11 denominator guard


# ----------------------------------------------------------------------------------------------
# Eq. 9 - lambda schedule
# ----------------------------------------------------------------------------------------------
def lambda_at(step: int, lam0: float, decay_steps: float | None) -> float:
    """Eq. 9: lam_t = lam0 * max(0, 1 - t / T_decay); T_decay None or math.inf -> constant lam0."""
    if decay_steps is None or math.isinf(decay_steps):
        return float(lam0)
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be > 0, None or math.inf (got {decay_steps})")
    return float(lam0) * max(0.0, 1.0 - step / decay_steps)


# ----------------------------------------------------------------------------------------------
# Eq. 4-5 - token gap and step score
# ----------------------------------------------------------------------------------------------
def token_gap(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 4: Delta = log pi_T - log pi_S on target tokens, 0 elsewhere; [B, T] -> [B, T], detached.

    Values off the targets (possibly garbage or NaN there) are never read into the result.
    """
    gap = (teacher_logp - student_logp).detach()
    return torch.where(target_mask.bool(), gap, torch.zeros_like(gap))


class StepScores(NamedTuple):
    """Eq. 5 step scores, one entry per (row, k) present, sorted by row then k. All [S]."""

    scores: torch.Tensor  # S_{i,k} = sum over the span of Delta
    rows: torch.Tensor  # row index i of each score (long)
    steps: torch.Tensor  # step index k of each score (long)


def _row_step_keys(step_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened (row, k) key [B, T] = row * K + k (valid where step_ids >= 0), and K."""
    n_k = int(step_ids.max().clamp(min=0)) + 1 if step_ids.numel() else 1
    rows = torch.arange(step_ids.shape[0], device=step_ids.device).unsqueeze(1)  # [B, 1]
    return rows * n_k + step_ids.long(), n_k


def step_scores(delta: torch.Tensor, step_ids: torch.Tensor) -> StepScores:
    """Eq. 5 (diagnostic): S_{i,k} = sum_{l in Z_{i,k}} Delta_l; delta [B, T], step_ids [B, T].

    A (row, k) is present when at least one token carries step id k (the loss mask is not used).
    """
    target = step_ids >= 0
    keys, n_k = _row_step_keys(step_ids)
    uniq, inv = torch.unique(keys[target], return_inverse=True)  # [S], [n_target]
    scores = torch.zeros(uniq.numel(), dtype=delta.dtype, device=delta.device)
    scores.index_add_(0, inv, delta.detach()[target])
    return StepScores(scores=scores, rows=uniq // n_k, steps=uniq % n_k)


def sign_agreement(scores: torch.Tensor, success_per_score: torch.Tensor) -> float:
    """§8 diagnostic: share of steps with S > 0 in a successful trajectory or S < 0 in a failed
    one.

    scores [S]; success_per_score [S] (bool or 0/1, e.g. success[step_scores(..).rows]).
    S == 0 counts as disagreement. Returns NaN when there is no step (nothing to agree on).
    """
    if scores.numel() == 0:
        return float("nan")
    ok = success_per_score.bool()
    agree = (ok & (scores > 0)) | (~ok & (scores < 0))
    return agree.double().mean().item()


# ----------------------------------------------------------------------------------------------
# Eq. 6-8, 10-12 - shaped advantages
# ----------------------------------------------------------------------------------------------
def _check_knobs(alpha_clip: float, lam: float, weight_fn: str, budget_clip: float | None) -> None:
    if not 0.0 < alpha_clip <= 1.0:
        raise ValueError(f"alpha_clip must be in (0, 1] (got {alpha_clip}); the default is 0.2")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (got {lam}); use 0 for plain GRPO")
    if weight_fn not in WEIGHT_FNS:
        raise ValueError(f"unknown weight_fn {weight_fn!r}; use one of {', '.join(WEIGHT_FNS)}")
    if budget_clip is not None and not budget_clip >= 1.0:
        raise ValueError(f"budget_clip must be >= 1 or None to disable (got {budget_clip}); "
                         "the default is 2")


def _step_budget(
    shaped: torch.Tensor,
    step_ids: torch.Tensor,
    mask: torch.Tensor,
    traj_ids: torch.Tensor | None,
    budget_clip: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 10-12 on shaped advantages [B, T]; returns [B, T]. Vectorised over (row, k) keys. With `base` (the
    advantages before shaping) M_k is the mean multiplier |Ã / A| of step k (1 where A = 0) instead of |Ã|."""
    n_rows = shaped.shape[0]
    if traj_ids is None:
        traj = torch.arange(n_rows, device=shaped.device)
    else:
        if traj_ids.shape != (n_rows,):
            raise ValueError(f"traj_ids must be [B] = [{n_rows}]; got {tuple(traj_ids.shape)}")
        traj = torch.unique(traj_ids, return_inverse=True)[1].to(shaped.device)  # [B] contiguous
    target = step_ids >= 0  # [B, T]
    counted = target & mask.bool()  # tokens of Eq. 10: l in Z_k with m = 1
    if not counted.any():
        return shaped
    keys, n_k = _row_step_keys(step_ids)  # [B, T]
    steps, inv = torch.unique(keys[counted], return_inverse=True)  # steps with targets: [S]
    n_steps = steps.numel()
    ones = torch.ones_like(shaped[counted])
    n_tok = torch.zeros(n_steps, dtype=shaped.dtype, device=shaped.device).index_add_(0, inv, ones)
    size = shaped.abs() if base is None else torch.where(base != 0, shaped.abs() / base.abs().clamp(min=1e-30), 1.0)
    abs_sum = torch.zeros_like(n_tok).index_add_(0, inv, size[counted])
    m_k = abs_sum / n_tok  # Eq. 10: M_k, [S]
    step_traj = traj[steps // n_k]  # trajectory of each step, [S]
    n_traj = int(traj.max()) + 1
    k_per_traj = torch.zeros(n_traj, dtype=shaped.dtype, device=shaped.device).index_add_(
        0, step_traj, torch.ones_like(m_k))  # [n_traj]
    m_bar = torch.zeros_like(k_per_traj).index_add_(0, step_traj, m_k) / k_per_traj.clamp(min=1)
    ratio = m_bar[step_traj] / (m_k + _BUDGET_EPS)
    kappa = torch.clamp(ratio, 1.0 / budget_clip, budget_clip)  # Eq. 11: kappa_k, [S]
    multi = k_per_traj[step_traj] >= 2  # only trajectories with >= 2 steps with targets
    kappa = torch.where(multi, kappa, torch.ones_like(kappa))

    # Eq. 12: scale every token of Z_k (mask 0 ones too; they carry A = 0 in practice). Spans whose
    # tokens all have mask 0 are not steps with targets (not in `steps`) and keep their value.
    pos = torch.searchsorted(steps, keys.clamp(min=0)).clamp(max=n_steps - 1)  # [B, T]
    found = target & (steps[pos] == keys)
    return torch.where(found, shaped * kappa[pos], shaped)


def shape_advantages(
    advantages: torch.Tensor,
    delta: torch.Tensor,
    step_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha_clip: float,
    lam: float,
    weight_fn: str = "sigmoid",
    budget_clip: float | None = 2.0,
    traj_ids: torch.Tensor | None = None,
    budget_on: str = "advantage",
) -> torch.Tensor:
    """Step-aware advantages: Eq. 6-8, then the per-step budget Eq. 10-12. Returns [B, T].

    advantages [B, T]  token-level GRPO advantage A_{i,l} (= A_i * m_{i,l}, Eq. 1)
    delta [B, T]       token gap of Eq. 4; read only where step_ids >= 0 (elsewhere Delta := 0)
    step_ids [B, T]    step index k on target tokens, -1 elsewhere
    mask [B, T]        loss mask (only the budget's M_k of Eq. 10 reads it)
    traj_ids [B]       trajectory of each row (step-per-row layout); None: each row is one
    budget_clip        C of Eq. 11; None switches the budget off
    budget_on          what Eq. 10's M_k averages: "advantage" |Ã| (the spec), or "multiplier" |Ã / A|, for a base
                       estimator whose |A| differs from step to step (GiGPO): the budget then equalises the teacher's
                       reshaping across steps and keeps the base's own step-to-step credit. With a base whose |A| is
                       the same on every step of a trajectory (GRPO, Dr.GRPO, RLOO) both give the same κ_k up to
                       where the 1e-6 of Eq. 11 sits.

    Eq. 6  w_raw = 2*sigmoid(sign(A)*Delta)   or exp(sign(A)*Delta)     (sign(0) = 0 -> w_raw = 1)
    Eq. 7  w = clip(w_raw, 1 - alpha, 1 + alpha)
    Eq. 8  A~ = A * ((1 - lam) + lam*w), computed as A * (1 + lam*(w - 1))
    Since w > 0, sign(A~) = sign(A) and |A~/A - 1| <= lam*alpha before the budget.
    lam == 0 returns a bitwise copy of `advantages`, budget skipped too (exact GRPO, spec §2).
    """
    _check_knobs(alpha_clip, lam, weight_fn, budget_clip)
    if budget_on not in ("advantage", "multiplier"):
        raise ValueError(f"budget_on={budget_on!r}: use advantage (Eq. 10) or multiplier")
    same = advantages.shape == delta.shape == step_ids.shape == mask.shape
    if not same or advantages.dim() != 2:
        raise ValueError("advantages, delta, step_ids and mask must all be [B, T]; got "
                         f"{[tuple(t.shape) for t in (advantages, delta, step_ids, mask)]}")
    if lam == 0:
        return advantages.clone()
    adv = advantages.detach()
    target = step_ids >= 0
    d = torch.where(target, delta.detach(), torch.zeros_like(delta)).to(adv.dtype)  # [B, T]
    signed = torch.sign(adv) * d
    w_raw = 2.0 * torch.sigmoid(signed) if weight_fn == "sigmoid" else torch.exp(signed)  # Eq. 6
    w = torch.clamp(w_raw, 1.0 - alpha_clip, 1.0 + alpha_clip)  # Eq. 7
    shaped = adv * (1.0 + lam * (w - 1.0))  # Eq. 8
    if budget_clip is None:
        return shaped
    return _step_budget(shaped, step_ids, mask, traj_ids, budget_clip, adv if budget_on == "multiplier" else None)


# ----------------------------------------------------------------------------------------------
# Knobs (§9-12)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepOPSDConfig:
    """StepOPSD knobs (§6, §9-12). Validated on construction.

    alpha_clip          Eq. 7 trust region, in (0, 1]
    lam0                Eq. 9 initial mixing strength lam_0, in [0, 1]; 0 = plain GRPO
    decay_steps         Eq. 9 T_decay (> 0), None or math.inf = constant lam0
    weight_fn           Eq. 6: sigmoid | exp
    budget_clip         Eq. 11 C (>= 1), None = budget off
    teacher_refresh     N_ref: optimizer steps between teacher snapshots; 0 = live teacher (§7)
    target_span         §5: action_only | clean_step_no_observation | full_step
    peer_budget_tokens  §6: token budget of the peer trajectory in the hindsight block
    """

    alpha_clip: float = 0.2
    lam0: float = 0.2
    decay_steps: float | None = 50
    weight_fn: str = "sigmoid"
    budget_clip: float | None = 2.0
    teacher_refresh: int = 10
    target_span: str = "action_only"
    peer_budget_tokens: int = 512

    def __post_init__(self) -> None:
        _check_knobs(self.alpha_clip, self.lam0, self.weight_fn, self.budget_clip)
        if self.decay_steps is not None and not self.decay_steps > 0:
            raise ValueError(f"decay_steps must be > 0, or None for a constant lam0 "
                             f"(got {self.decay_steps})")
        if self.teacher_refresh < 0:
            raise ValueError(f"teacher_refresh must be >= 0 (got {self.teacher_refresh}); "
                             "0 means a live teacher, 10 is the default")
        if self.target_span not in TARGET_SPAN_MODES:
            raise ValueError(f"unknown target_span {self.target_span!r}; use one of "
                             f"{', '.join(TARGET_SPAN_MODES)}")
        if self.peer_budget_tokens < 1:
            raise ValueError(f"peer_budget_tokens must be >= 1 (got {self.peer_budget_tokens}); "
                             "512 for ALFWorld, 1024 for Search-QA")

    def lam(self, step: int) -> float:
        """lam_t of Eq. 9 at optimizer step `step`."""
        return lambda_at(step, self.lam0, self.decay_steps)
