"""GRPO: group-relative advantages (Eq. 1) and the PPO-clip policy loss (Eq. 13-14).

Pure tensor functions, no state. Shapes: N = trajectories (one reward each), B = rows, T = tokens
per row (the loss mask's second dimension), V = vocabulary.

What is implemented:
* `group_advantages` - Eq. 1 with the unbiased group std (as verl and TRL use) or, with
  `scale_by_std=False`, the Dr.GRPO centring R - mean. Broadcasting to tokens (A_i * m_il) is
  left to the caller.
* `policy_loss` / `aggregate` - the clipped surrogate of Eq. 13-14 with three aggregations.
  The KL term (`kl_k3`) and the entropy term (`entropy_from_logits`) are separate functions; the
  caller adds beta_KL * aggregate(kl) - c_ent * aggregate(H) so each can be logged on its own.
* `ppo_stats` - the diagnostics a reviewer asks for first (approx-KL, clip fraction, ratios).
* `PPOConfig` - the update's knobs (`algorithm.ppo`), each default written here only.
* `truncated_is_weights` - truncated importance sampling between the rollout engine and the trainer
  (off by default: `ppo.rollout_is_cap`), for an engine whose log-probs drift slightly from the trainer's.

Simplifications: no dual-clip (the c-bound on negative advantages some PPO variants add), no
clamping inside the k3 estimator, and an all-zero mask aggregates to 0 rather than NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclass(frozen=True)
class PPOConfig:
    """The PPO update's knobs (`algorithm.ppo`; every algorithm's config holds one). Validated on construction."""

    lr: float = 1e-6
    warmup_steps: int = 0  # linear learning-rate warm-up over this many training steps (Search-QA: 10 %)
    weight_decay: float = 0.0
    epochs: int = 1
    mini_batch_rows: int = 256  # rows per optimizer step (the protocol's unit)
    micro_batch_rows: int = 0  # rows per forward/backward inside a mini-batch (0: the whole mini-batch)
    micro_batch_tokens: int = 0  # and/or at most this many padded tokens per micro-batch (0: no budget)
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token_mean"
    kl_coef: float = 0.01
    entropy_coef: float = 0.001
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # the rollout's sampling temperature, log-probs are taken at it (config: rollout.temperature)
    logp_gap_threshold: float = 0.05  # max |trainer - rollout| log-prob (mean over tokens) before the first update
    # truncated importance sampling rollout -> trainer: 0 = off, a value >= 1 is the cap; None: the run picks,
    # 2.0 under rollout.backend=vllm (its gap is systematic: HF Qwen under autocast with fp32 master weights keeps
    # the embeddings, residual stream and RMSNorm in fp32, the bf16 engine does not), 0 under hf (outside a run: off)
    rollout_is_cap: float | None = None
    max_nonfinite_updates: int = 3  # skipped non-finite updates in a row before the run stops

    def __post_init__(self):
        if self.lr <= 0 or self.epochs < 1 or self.mini_batch_rows < 1 or self.warmup_steps < 0:
            raise ValueError("ppo: lr must be > 0, epochs >= 1, mini_batch_rows >= 1 and warmup_steps >= 0")
        if self.micro_batch_rows < 0 or self.micro_batch_tokens < 0 or self.micro_batch_rows > self.mini_batch_rows:
            raise ValueError(f"ppo.micro_batch_rows={self.micro_batch_rows}, micro_batch_tokens={self.micro_batch_tokens}: "
                             f"need 0 <= micro_batch_rows <= mini_batch_rows ({self.mini_batch_rows}) and tokens >= 0 "
                             "(0 = off)")
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            raise ValueError(f"ppo: need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"ppo.agg={self.agg!r}: choose one of {', '.join(AGGREGATIONS)}")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.max_grad_norm <= 0 or self.temperature <= 0:
            raise ValueError("ppo: kl_coef and entropy_coef must be >= 0, max_grad_norm and temperature > 0")
        if self.max_nonfinite_updates < 1:
            raise ValueError(f"ppo.max_nonfinite_updates={self.max_nonfinite_updates}: need >= 1")
        if self.rollout_is_cap not in (None, 0) and not self.rollout_is_cap >= 1:
            raise ValueError(f"ppo.rollout_is_cap={self.rollout_is_cap}: use 0 (off) or a cap >= 1 (2.0 is usual)")


# ----------------------------------------------------------------------------------------------
# Eq. 1 - group-relative advantage
# ----------------------------------------------------------------------------------------------
def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Arbitrary integer ids [N] -> contiguous group index [N] in 0..G-1, and G."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Eq. 1: A_i = (R_i - mean_group R) / (std_group R + eps), per trajectory.

    rewards [N] (any real dtype), group_ids [N] (any integers, need not be sorted or contiguous).
    Returns [N] in the rewards' float dtype (float32 for integer rewards).
    std is the unbiased one (correction 1). A group of one member has no std: it is taken as 0,
    and its advantage is 0 anyway since R - mean = 0. A uniform group gives exactly 0.
    scale_by_std=False returns R - mean (Dr.GRPO).
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)  # accumulate in float64; cast back at the end
    idx, n_groups = _group_index(group_ids)
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(
        0, idx, torch.ones_like(r))  # [G]
    mean = torch.zeros_like(count).index_add_(0, idx, r) / count  # [G]
    centred = r - mean[idx]  # [N]
    if not scale_by_std:
        return centred.to(out_dtype)
    sq = torch.zeros_like(count).index_add_(0, idx, centred * centred)  # [G]
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))  # unbiased
    std = var.sqrt()  # [G]; singleton groups -> 0
    return (centred / (std[idx] + eps)).to(out_dtype)


def uniform_group_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """§4 diagnostic: share of groups whose rewards are all equal (they carry A = 0).

    rewards [N], group_ids [N]. Singleton groups count as uniform. Returns 0.0 for N = 0.
    """
    if rewards.numel() == 0:
        return 0.0
    idx, n_groups = _group_index(group_ids)
    r = rewards.to(torch.float64)
    hi = torch.full((n_groups,), -torch.inf, dtype=r.dtype, device=r.device)
    lo = torch.full((n_groups,), torch.inf, dtype=r.dtype, device=r.device)
    hi = hi.scatter_reduce(0, idx, r, reduce="amax")  # [G]
    lo = lo.scatter_reduce(0, idx, r, reduce="amin")  # [G]
    return (hi == lo).double().mean().item()


# ----------------------------------------------------------------------------------------------
# Eq. 14 - aggregation and the clipped surrogate
# ----------------------------------------------------------------------------------------------
def aggregation_counts(mask: torch.Tensor, agg: str) -> tuple[int, int]:
    """(count, horizon) of a mini-batch mask [B, T] before any clamping: token_mean counts the mask's tokens,
    seq_mean_token_mean its rows with >= 1 token, seq_mean_token_sum_norm its rows; horizon = T. Several
    ranks' counts add up (and their horizons take the max) to the union's (`GRPOModule.accumulate`)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; use one of {', '.join(AGGREGATIONS)}")
    keep = mask.bool()
    if agg == "token_mean":
        count = int(keep.sum())
    elif agg == "seq_mean_token_mean":
        count = int((keep.sum(dim=-1) > 0).sum())
    else:
        count = mask.shape[0]
    return count, int(mask.shape[-1])


def aggregation_norm(mask: torch.Tensor, agg: str) -> tuple[float, int]:
    """(denominator, horizon) of `aggregate` for a whole mini-batch mask [B, T]: what each of its
    micro-batches must divide by so that their summed losses equal the one-pass loss (Eq. 14 under
    gradient accumulation). token_mean: the mask's token count; seq_mean_token_mean: its rows with
    >= 1 token; seq_mean_token_sum_norm: its row count. horizon = T (the Dr.GRPO constant length).
    Counts are clamped to >= 1 (an all-zero mask aggregates to 0)."""
    count, horizon = aggregation_counts(mask, agg)
    return float(max(count, 1)), horizon


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, *,
              norm: tuple[float, int] | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] under the loss mask [B, T] to a scalar (the agg of Eq. 14).

    token_mean               sum(v*m) / sum(m) over the whole batch
    seq_mean_token_mean      mean over rows with >= 1 mask token of each row's masked token mean
    seq_mean_token_sum_norm  (Dr.GRPO) each row's sum(v*m) / T with T = mask.shape[1], mean over
                             all rows (the trainer passes the response window of a mini-batch, so
                             T is its longest response span)
    `norm` = `aggregation_norm(whole_mask, agg)` when [B, T] is one micro-batch of a larger
    mini-batch: the numerator is this micro-batch's, the denominator (and T) the mini-batch's, so
    the micro-batches' values add up to the mini-batch's.
    Masked-out values are excluded with `where`, so NaN/inf there never leak. An all-zero mask
    gives 0 (with a gradient of zeros) instead of NaN.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; use one of {', '.join(AGGREGATIONS)}")
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values and mask must both be [B, T]; got {tuple(values.shape)} and "
                         f"{tuple(mask.shape)}")
    denom, horizon = norm if norm is not None else aggregation_norm(mask, agg)
    keep = mask.bool()
    masked = torch.where(keep, values, torch.zeros_like(values))  # [B, T]
    if agg == "token_mean":
        return masked.sum() / denom
    row_sum = masked.sum(dim=-1)  # [B]
    if agg == "seq_mean_token_mean":
        row_mean = row_sum / keep.sum(dim=-1).clamp(min=1)  # [B]; rows without tokens add 0
        return row_mean.sum() / denom
    # seq_mean_token_sum_norm: divide by the constant max length T, not by each row's length
    return (row_sum / horizon).sum() / denom


def _check_clip(clip_low: float, clip_high: float) -> None:
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError(f"clip_low and clip_high must be > 0 (got {clip_low}, {clip_high}); "
                         "the usual value is 0.2")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token_mean",
    norm: tuple[float, int] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 13-14 without the KL and entropy terms; all inputs [B, T], returns a scalar (`norm`: see
    `aggregate`, for a micro-batch of a larger mini-batch).

    Eq. 13: r = exp(logp - old_logp).
    Eq. 14: per-token loss = -min(r*A, clip(r, 1 - clip_low, 1 + clip_high)*A), aggregated by
    `aggregate(.., mask, agg)`. Gradients flow into `logp` only (old_logp and A are detached).
    `weights` [B, T] (detached) multiply the per-token loss: the truncated importance weights of
    `truncated_is_weights` when the rollout engine is not the trainer.
    """
    _check_clip(clip_low, clip_high)
    if agg not in AGGREGATIONS:  # checked before any compute so a typo fails fast
        raise ValueError(f"unknown agg {agg!r}; use one of {', '.join(AGGREGATIONS)}")
    adv = advantages.detach()
    ratio = torch.exp(logp - old_logp.detach())  # Eq. 13, [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # -min(rA, clip(r)A), Eq. 14
    if weights is not None:
        per_token = per_token * weights.detach()
    return aggregate(per_token, mask, agg, norm=norm)


def truncated_is_weights(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) between the engine that sampled and the trainer: w = min(pi_old /
    pi_rollout, cap) = min(exp(trainer_logp - rollout_logp), cap) per token, [B, T] -> [B, T], detached.

    The PPO ratio of Eq. 13 is then taken against the trainer's own pi_old (`trainer_logp`, recomputed before
    the update), and w corrects for the tokens having been sampled from the engine's slightly different
    pi_rollout (verl's TIS, TRL's vllm_importance_sampling_correction). cap >= 1: an upper truncation only,
    so the correction's variance stays bounded; w = 1 when both engines agree exactly."""
    if not cap >= 1.0:
        raise ValueError(f"rollout_is_cap={cap} must be >= 1 (a cap below 1 would down-weight on-policy tokens)")
    return torch.exp(trainer_logp.detach().float() - rollout_logp.detach().float()).clamp(max=cap)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """§11 / Eq. 14 KL term: k3 estimator of KL(pi_theta || pi_ref) per token, [B, T] -> [B, T].

    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 (unbiased, low variance; Schulman's note).
    Aggregate it with `aggregate` under the loss mask.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@torch.no_grad()
def ppo_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> dict[str, float]:
    """CleanRL-style diagnostics over the masked tokens; inputs [B, T].

    approx_kl      mean of (r - 1) - log r  (k3 of the ratio, Eq. 13)
    clip_fraction  share of tokens where the clipped term is the one Eq. 14 selects and it
                   differs from the unclipped one (A > 0 and r > 1 + clip_high, or A < 0 and
                   r < 1 - clip_low): exactly the tokens whose gradient clipping zeroes
    ratio_mean, ratio_max, ratio_min
    With no masked token every value is 0.0.
    """
    _check_clip(clip_low, clip_high)
    keep = mask.bool()
    n = int(keep.sum())
    if n == 0:
        return {"approx_kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "ratio_max": 0.0,
                "ratio_min": 0.0}
    log_r = (logp - old_logp)[keep]  # [n]
    r = log_r.exp()
    adv = advantages[keep]
    unclipped = -adv * r
    clipped = -adv * r.clamp(1.0 - clip_low, 1.0 + clip_high)
    return {
        "approx_kl": ((r - 1.0) - log_r).mean().item(),
        "clip_fraction": (clipped > unclipped).double().mean().item(),
        "ratio_mean": r.mean().item(),
        "ratio_max": r.max().item(),
        "ratio_min": r.min().item(),
    }


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H of the categorical given by logits [B, T, V] -> [B, T] (the c_ent term of Eq. 14).

    H = logsumexp(z) - sum_v softmax(z)_v * z_v. Logits must be finite.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
