"""GRPO math (Eq. 1, 13-14, §11): numbers computed by hand in the comments."""
import math

import pytest
import torch

from stepopsd.algorithms.grpo import (
    aggregate,
    entropy_from_logits,
    group_advantages,
    kl_k3,
    policy_loss,
    truncated_is_weights,
    ppo_stats,
    uniform_group_fraction,
)


def close(actual, expected, tol=1e-5):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


# ---------------------------------------------------------------------------- Eq. 1
def test_one_group_unbiased_std():
    # [10, 0, 0, 10]: mean 5, deviations +-5, sum of squares 100, unbiased var 100/3 = 33.33,
    # std 5.7735 -> A = +-5 / 5.7735 = +-0.8660
    a = group_advantages(torch.tensor([10.0, 0.0, 0.0, 10.0]), torch.tensor([0, 0, 0, 0]))
    close(a, [0.8660254, -0.8660254, -0.8660254, 0.8660254])


def test_two_interleaved_groups_with_arbitrary_ids():
    # group 7 (positions 0, 2, 4): rewards 10, 0, 5 -> mean 5, deviations 5, -5, 0,
    #   unbiased var (25 + 25 + 0) / 2 = 25, std 5 -> A = 1, -1, 0
    # group 3 (positions 1, 3, 5): rewards 1, 3, 2 -> mean 2, deviations -1, 1, 0,
    #   unbiased var (1 + 1) / 2 = 1, std 1 -> A = -1, 1, 0  (eps 1e-6 is below tolerance)
    rewards = torch.tensor([10.0, 1.0, 0.0, 3.0, 5.0, 2.0])
    ids = torch.tensor([7, 3, 7, 3, 7, 3])
    close(group_advantages(rewards, ids), [1.0, -1.0, -1.0, 1.0, 0.0, 0.0])
    # matches torch.std (correction=1) group by group
    for g in (3, 7):
        sel = ids == g
        ref = (rewards[sel] - rewards[sel].mean()) / (rewards[sel].std() + 1e-6)
        close(group_advantages(rewards, ids)[sel], ref, tol=1e-6)


def test_scale_by_std_off_is_dr_grpo_centring():
    # same groups: R - mean = 10-5, 1-2, 0-5, 3-2, 5-5, 2-2
    rewards = torch.tensor([10.0, 1.0, 0.0, 3.0, 5.0, 2.0])
    a = group_advantages(rewards, torch.tensor([7, 3, 7, 3, 7, 3]), scale_by_std=False)
    close(a, [5.0, -1.0, -5.0, 1.0, 0.0, 0.0])


def test_singleton_group_gets_zero_and_integer_rewards():
    # group 0: 1, 3 -> mean 2, unbiased var (1+1)/1 = 2, std 1.4142 -> -0.7071, +0.7071
    # group 9: one member -> std taken as 0, R - mean = 0 -> A = 0 (not NaN)
    a = group_advantages(torch.tensor([1, 3, 7]), torch.tensor([0, 0, 9]))
    assert a.dtype == torch.float32
    close(a, [-0.7071068, 0.7071068, 0.0])
    assert torch.isfinite(a).all()


def test_uniform_groups_give_zero_and_their_fraction():
    # groups 0 (1, 1) and 2 (0, 0) are uniform, group 1 (0, 1) is mixed -> fraction 2/3
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    a = group_advantages(rewards, ids)
    assert torch.equal(a[[0, 1, 4, 5]], torch.zeros(4))
    # mixed group: 0, 1 -> mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> -+0.7071
    close(a[2:4], [-0.7071068, 0.7071068])
    assert uniform_group_fraction(rewards, ids) == pytest.approx(2 / 3)
    assert uniform_group_fraction(torch.tensor([1.0, 0.0]), torch.tensor([5, 5])) == 0.0


# ---------------------------------------------------------------------------- Eq. 13-14
# A 2x3 batch with old_logp = 0, so r = exp(logp):
#   row 0: r = 1.5, A = +1  -> min(1.5, clip 1.2) = 1.2   -> loss -1.2  (clipped)
#          r = 1.0, A = +2  -> 2                          -> loss -2.0
#          r = 3.0, A = +5, mask 0 (ignored)
#   row 1: r = 0.5, A = -1  -> min(-0.5, -0.8) = -0.8     -> loss +0.8  (clipped)
#          r = 0.9, A = -1  -> min(-0.9, -0.9)            -> loss +0.9  (unclipped)
#          r = 1.1, A = 0.5 -> min(0.55, 0.55)            -> loss -0.55 (unclipped)
RATIOS = [[1.5, 1.0, 3.0], [0.5, 0.9, 1.1]]
ADV = [[1.0, 2.0, 5.0], [-1.0, -1.0, 0.5]]
MASK = [[1, 1, 0], [1, 1, 1]]


def batch():
    logp = torch.tensor(RATIOS).log().requires_grad_(True)
    return logp, torch.zeros(2, 3), torch.tensor(ADV), torch.tensor(MASK, dtype=torch.float32)


@pytest.mark.parametrize(
    "agg, expected",
    [
        # sum = -1.2 - 2 + 0.8 + 0.9 - 0.55 = -2.05 over 5 tokens
        ("token_mean", -0.41),
        # row means: -3.2/2 = -1.6 and 1.15/3 = 0.383333 -> mean -0.608333
        ("seq_mean_token_mean", (-1.6 + 1.15 / 3) / 2),
        # row sums / T=3: -1.066667 and 0.383333 -> mean -0.341667
        ("seq_mean_token_sum_norm", (-3.2 / 3 + 1.15 / 3) / 2),
    ],
)
def test_policy_loss_aggregations(agg, expected):
    logp, old, adv, mask = batch()
    close(policy_loss(logp, old, adv, mask, agg=agg), expected)


def test_policy_loss_asymmetric_clip_and_gradient_only_on_unclipped_tokens():
    logp, old, adv, mask = batch()
    # clip_high 0.28: row 0 token 0 -> min(1.5, 1.28) -> -1.28; total -1.28 - 2 + 0.8 + 0.9 - 0.55
    loss = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(loss, (-1.28 - 2.0 + 0.8 + 0.9 - 0.55) / 5)
    loss.backward()
    # d loss / d logp = -A r / 5 on unclipped masked tokens, 0 on clipped or masked ones
    close(logp.grad, [[0.0, -2.0 / 5, 0.0], [0.0, 0.9 / 5, -0.55 / 5]])


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.randn(2, 3)
    adv, mask = torch.tensor(ADV), torch.tensor(MASK)
    # masked A: 1, 2, -1, -1, 0.5 -> mean 0.3 -> loss -0.3
    close(policy_loss(logp, logp.clone(), adv, mask), -0.3)


def test_truncated_is_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    rollout = torch.tensor([[-1.0, -2.5, 0.5]])
    # exp(0) = 1, exp(0.5) = 1.648721, exp(-1) = 0.367879; cap 1.5 truncates the second
    close(truncated_is_weights(trainer, rollout, 1.5), [[1.0, 1.5, math.exp(-1.0)]])
    close(truncated_is_weights(trainer, rollout, 2.0), [[1.0, math.exp(0.5), math.exp(-1.0)]])
    with pytest.raises(ValueError, match="must be >= 1"):
        truncated_is_weights(trainer, rollout, 0.5)


def test_policy_loss_weights_multiply_each_token():
    logp, old, adv, mask = batch()
    w = torch.tensor([[2.0, 0.5, 9.0], [1.0, 0.0, 3.0]])
    # the per-token terms of test_policy_loss_aggregations: row 0 [-1.2, -2, masked], row 1 [0.8, 0.9, -0.55]
    # -> weighted (-2.4 - 1 + 0.8 + 0 - 1.65) / 5
    close(policy_loss(logp, old, adv, mask, weights=w), (-2.4 - 1.0 + 0.8 + 0.0 - 1.65) / 5)
    close(policy_loss(logp, old, adv, mask, weights=torch.ones(2, 3)), -0.41)


def test_aggregate_skips_empty_rows_and_nan_outside_mask():
    values = torch.tensor([[1.0, 3.0, float("nan")], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # token_mean (1+3)/2 = 2; seq_mean_token_mean: row 1 has no token -> only row 0's mean 2;
    # seq_mean_token_sum_norm: (4/3 + 0/3) / 2 = 0.666667
    close(aggregate(values, mask, "token_mean"), 2.0)
    close(aggregate(values, mask, "seq_mean_token_mean"), 2.0)
    close(aggregate(values, mask, "seq_mean_token_sum_norm"), 2.0 / 3)
    close(aggregate(values, torch.zeros(2, 3), "token_mean"), 0.0)


def test_policy_loss_rejects_bad_knobs():
    logp, old, adv, mask = batch()
    with pytest.raises(ValueError, match="token_mean"):
        policy_loss(logp, old, adv, mask, agg="seq_sum")
    with pytest.raises(ValueError, match="> 0"):
        policy_loss(logp, old, adv, mask, clip_low=0.0)
    with pytest.raises(ValueError, match="> 0"):
        policy_loss(logp, old, adv, mask, clip_high=-0.1)


# ------------------------------------------------------------------- §11 KL, stats, entropy
def test_kl_k3_hand_point():
    # logp -1, ref -2 -> d = ref - logp = -1 -> e^-1 - (-1) - 1 = 0.367879; equal -> 0
    k = kl_k3(torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]]))
    close(k, [[math.exp(-1.0), 0.0]])
    assert (kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_ppo_stats_hand_example():
    logp, old, adv, mask = batch()
    s = ppo_stats(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # clipping active on row 0 token 0 (A>0, r>1.2) and row 1 token 0 (A<0, r<0.8): 2 of 5
    assert s["clip_fraction"] == pytest.approx(0.4)
    # (r-1) - log r: 0.094535, 0, 0.193147, 0.005361, 0.004690 -> sum 0.297733 / 5 = 0.059546
    assert s["approx_kl"] == pytest.approx(0.0595465, abs=1e-6)
    # masked ratios 1.5, 1, 0.5, 0.9, 1.1 (the masked-out 3.0 is ignored)
    assert s["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert s["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    assert s["ratio_min"] == pytest.approx(0.5, abs=1e-6)
    # flipping A: r = 1.5 with A = -1 and r = 0.5 with A = +1 pick the unclipped (pessimistic)
    # term, and 0.9, 1.0, 1.1 lie inside [0.8, 1.2] -> no token is clipped
    s2 = ppo_stats(logp, old, -adv, mask, clip_low=0.2, clip_high=0.2)
    assert s2["clip_fraction"] == 0.0


def test_entropy_uniform_and_peaked():
    # uniform over V = 5 -> log 5 = 1.609438
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    close(entropy_from_logits(peaked), [[0.0]])
    # two-way 1:3 odds: p = 0.25, 0.75 -> -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]])), [[0.5623351]])
