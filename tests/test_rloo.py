"""RLOO (stepopsd/estimators/rloo.py): A_i = R_i - mean of the other G - 1 rewards of its group, numbers by hand.

Group 7 rewards (1, 0, 0): A = 1 - 0 = 1; 0 - (1 + 0) / 2 = -0.5 twice. Group 3 rewards (3, 5): -2 and +2.
Group 9, one member (4): no other reward, A = 0. The groups' ids are not sorted and not contiguous.
"""
import pytest
import torch

from stepopsd.estimators import Context, build_estimator
from stepopsd.estimators.rloo import rloo_advantages

from helpers.batches import batch_of


def test_leave_one_out_by_hand():
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0, 0.0, 5.0])
    groups = torch.tensor([7, 3, 7, 9, 7, 3])
    assert rloo_advantages(rewards, groups).tolist() == [1.0, -2.0, -0.5, 0.0, -0.5, 2.0]
    assert rloo_advantages(torch.tensor([2, 2, 2]), torch.tensor([0, 0, 0])).tolist() == [0.0, 0.0, 0.0]  # uniform
    assert rloo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).dtype == torch.float32  # integer rewards
    with pytest.raises(ValueError, match=r"\[N\]"):
        rloo_advantages(rewards, groups[:3])


def test_rloo_is_registered_and_fills_every_row_of_a_trajectory():
    batch = batch_of([10.0, 0.0, 0.0, 4.0], [0, 0, 1, 1])  # rows per trajectory: 2, 1, 1, 3
    out = build_estimator({"name": "rloo"}).advantages(batch, Context(step=0))
    assert out.trajectories.tolist() == [10.0, -10.0, -4.0, 4.0]  # two-member groups: R_i minus the other reward
    expect = torch.tensor([10.0, 10.0, -10.0, -4.0, 4.0, 4.0, 4.0])[:, None] * batch.loss_mask
    assert torch.equal(out.tokens, expect)
