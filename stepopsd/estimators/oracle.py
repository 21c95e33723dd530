"""The oracle: every step's exact advantage, from an environment that knows it (`EnvSpec.exact_credit`: the credit
env, docs/credit_env.md). The ceiling of the credit-assignment lab: what an estimator could do with perfect per-step
credit, on the same PPO update as every other estimator.

For step k of trajectory i in group g, A_{i,k} = exact(trajectory i, k, the actions the group's members took at
their step k): in the credit env every member of a group meets the same scene at step k whatever it did before
(no action reaches a later prompt), so those actions are G samples of the policy at s_k, and the exact advantage
w_j (1[a = right_j] - p_right) - c (1[invalid] - p_invalid) takes p_right and p_invalid as their shares. The advantage
is put on every loss token of the step's row. No teacher, no loss term; an environment without exact credit is
refused in one line before the run starts (`stepopsd.config.check_config`).
"""
from __future__ import annotations

import torch

from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Advantages, Context, Estimator, Services, register_estimator


@register_estimator("oracle")
class Oracle(Estimator):
    step_level = True  # its advantages differ from step to step
    needs_exact_credit = True

    def __init__(self):
        self.exact = None

    def setup(self, policy, services: Services) -> None:
        if services.exact_credit is None:
            raise ValueError("algorithm=oracle needs an environment that knows each step's exact credit (env=credit)")
        self.exact = services.exact_credit

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        trajs = batch.trajectories
        members: dict[int, list] = {}
        for t in trajs:
            members.setdefault(t.group, []).append(t)

        def actions(group: int, k: int) -> list:
            return [t.steps[k].transition.action if t.steps[k].transition.valid else None
                    for t in members[group] if k < len(t.steps)]

        row = [self.exact(trajs[m], k, actions(trajs[m].group, k))[0]
               for m, k in zip(batch.row_traj.tolist(), batch.row_step.tolist())]
        row = torch.tensor(row, dtype=batch.loss_mask.dtype, device=batch.loss_mask.device)
        return Advantages(row[:, None] * batch.loss_mask, None, {"oracle/abs_mean": float(row.abs().mean())})
