"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024; verl's `compute_rloo_outcome_advantage`).

A_i = R_i - mean of the other G - 1 rewards of its group = (G R_i - sum_group R) / (G - 1), on every row of
trajectory i. A group of one member has no other reward: A = 0. No division by the group's std.
"""
from __future__ import annotations

import torch

from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Advantages, Context, Estimator, per_token, register_estimator


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """rewards [N], group_ids [N] (any integers) -> [N]: R_i minus the mean of the other rewards of its group,
    in the rewards' float dtype (float32 for integer rewards); 0 for a group of one."""
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)
    _, idx = torch.unique(group_ids, return_inverse=True)
    groups = int(idx.max()) + 1 if idx.numel() else 0
    count = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, idx, torch.ones_like(r))  # [G]
    total = torch.zeros_like(count).index_add_(0, idx, r)  # [G]
    others = (count[idx] - 1).clamp(min=1)
    adv = torch.where(count[idx] > 1, r - (total[idx] - r) / others, torch.zeros_like(r))
    return adv.to(out_dtype)


@register_estimator("rloo")
class RLOO(Estimator):
    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        adv = rloo_advantages(batch.traj_reward, batch.traj_group)  # [M]
        return Advantages(per_token(adv, batch), adv)
