"""Outcome-level estimators: one advantage per trajectory from the group's outcome rewards, on every row of it.

grpo    Eq. 1: A_i = (R_i - mean_group R) / (std_group R + eps) (`algorithm.scale_by_std: true`, the default);
        with `scale_by_std: false` the Dr.GRPO centring R_i - mean.
drgrpo  Dr.GRPO (Liu et al. 2025): the centring R_i - mean, whatever `scale_by_std` says; its config
        (conf/algorithm/drgrpo.yaml) also sets the length-unbiased loss aggregation `seq_mean_token_sum_norm`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from stepopsd.algorithms.grpo import group_advantages
from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import AlgorithmConfig, Advantages, Context, Estimator, per_token, register_estimator


@dataclass
class GRPOConfig(AlgorithmConfig):
    scale_by_std: bool = True  # false: the Dr.GRPO centring R - mean


@register_estimator("grpo")
class GRPO(Estimator):
    config = GRPOConfig

    def __init__(self, scale_by_std: bool = True):
        self.scale_by_std = scale_by_std

    @classmethod
    def from_config(cls, algorithm: Mapping) -> "GRPO":
        return cls(scale_by_std=bool(algorithm.get("scale_by_std", True)))

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        adv = group_advantages(batch.traj_reward, batch.traj_group, scale_by_std=self.scale_by_std)  # [M]
        return Advantages(per_token(adv, batch), adv)


@register_estimator("drgrpo")
class DrGRPO(GRPO):
    config = AlgorithmConfig  # no std scaling to choose

    @classmethod
    def from_config(cls, algorithm: Mapping) -> "DrGRPO":
        return cls(scale_by_std=False)
