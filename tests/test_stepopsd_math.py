"""StepOPSD math (Eq. 4-12): numbers computed by hand in the comments."""
import math

import pytest
import torch

from stepopsd.algorithms.grpo import policy_loss
from stepopsd.algorithms.stepopsd import (
    StepOPSDConfig,
    lambda_at,
    shape_advantages,
    sign_agreement,
    step_scores,
    token_gap,
)


def close(actual, expected, tol=1e-5):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


# ---------------------------------------------------------------------------- Eq. 9
def test_lambda_schedule():
    assert lambda_at(0, 0.2, 50) == pytest.approx(0.2)
    assert lambda_at(25, 0.2, 50) == pytest.approx(0.1)  # 0.2 * (1 - 25/50)
    assert lambda_at(50, 0.2, 50) == 0.0
    assert lambda_at(80, 0.2, 50) == 0.0  # max(0, 1 - 80/50) = 0
    assert lambda_at(10**6, 0.2, math.inf) == pytest.approx(0.2)
    assert lambda_at(10**6, 0.2, None) == pytest.approx(0.2)
    assert StepOPSDConfig().lam(25) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- Eq. 4-5
def test_token_gap_detached_and_zero_off_target():
    teacher = torch.tensor([[-1.0, -0.5, float("nan")]], requires_grad=True)
    student = torch.tensor([[-2.0, -0.25, -3.0]])
    gap = token_gap(teacher, student, torch.tensor([[1, 1, 0]]))
    close(gap, [[1.0, -0.25, 0.0]])  # -1 - (-2) = 1; -0.5 - (-0.25) = -0.25; off target 0
    assert not gap.requires_grad


def test_step_scores_and_sign_agreement():
    # row 0: step 0 = 0.5 - 0.1 = 0.4, step 1 = -2 + 0.05 = -1.95; the 9s are off target
    # row 1: step 0 = 0 (a zero score), step 2 = 0.3
    delta = torch.tensor([[9.0, 0.5, -0.1, 9.0, -2.0, 0.05], [0.0, 0.0, 0.3, 0.0, 0.0, 0.0]])
    step_ids = torch.tensor([[-1, 0, 0, -1, 1, 1], [0, -1, 2, -1, -1, -1]])
    s = step_scores(delta, step_ids)
    close(s.scores, [0.4, -1.95, 0.0, 0.3])
    assert s.rows.tolist() == [0, 0, 1, 1] and s.steps.tolist() == [0, 1, 0, 2]
    # row 0 succeeded, row 1 failed: 0.4 > 0 agrees, -1.95 disagrees, 0 disagrees (zero),
    # 0.3 > 0 on a failure disagrees -> 1 of 4
    success = torch.tensor([True, False])[s.rows]
    assert sign_agreement(s.scores, success) == pytest.approx(0.25)
    # flipped (row 0 failed, row 1 succeeded): -1.95 on a failure and 0.3 on a success agree,
    # 0.4 on a failure and the zero do not -> 2 of 4
    assert sign_agreement(s.scores, ~success) == pytest.approx(0.5)
    assert math.isnan(sign_agreement(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))


# ---------------------------------------------------------------------------- Eq. 6-8
# One row, A = +1 on every loss token; tokens: think(-1), step 0 x2, observation(-1, mask 0),
# step 1 x2. Delta is 9 off target to show it is ignored there.
A1 = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
D1 = torch.tensor([[9.0, 0.5, -0.1, 9.0, -2.0, 0.05]])
S1 = torch.tensor([[-1, 0, 0, -1, 1, 1]])
M1 = torch.tensor([[1, 1, 1, 0, 1, 1]])
# Eq. 6 w_raw = 2 sigma(Delta): 2 sigma(0.5) = 1.244919, 2 sigma(-0.1) = 0.950042,
#                               2 sigma(-2) = 0.238406,   2 sigma(0.05) = 1.024995
# Eq. 7 clip to [0.8, 1.2]:     1.2, 0.950042, 0.8, 1.024995
# Eq. 8 lam 0.5: 0.5 + 0.5 w -> 1.1, 0.975021, 0.9, 1.012497
SHAPED1 = [[1.0, 1.1, 0.9750208, 0.0, 0.9, 1.0124974]]


def test_hand_example_without_budget():
    out = shape_advantages(A1, D1, S1, M1, alpha_clip=0.2, lam=0.5, budget_clip=None)
    close(out, SHAPED1)
    assert out[0, 0] == 1.0 and out[0, 3] == 0.0  # off target: exactly A


def test_hand_example_with_budget():
    # Eq. 10: M_0 = (1.1 + 0.975021)/2 = 1.037510, M_1 = (0.9 + 1.012497)/2 = 0.956249,
    #         M_bar = (1.037510 + 0.956249)/2 = 0.996880
    # Eq. 11: kappa_0 = 0.996880 / 1.037511 = 0.960837, kappa_1 = 0.996880 / 0.956250 = 1.042489
    # Eq. 12: 1.1*0.960837 = 1.056921, 0.975021*0.960837 = 0.936836,
    #         0.9*1.042489 = 0.938240, 1.012497*1.042489 = 1.055517; the think token keeps 1.0
    out = shape_advantages(A1, D1, S1, M1, alpha_clip=0.2, lam=0.5, budget_clip=2.0)
    close(out, [[1.0, 1.0569209, 0.9368363, 0.0, 0.9382399, 1.0555171]])
    # each step now has the same mean |A^| = 0.996880; the within-step ordering survives
    close(out[0, 1:3].abs().mean(), out[0, 4:6].abs().mean(), tol=1e-6)


def test_budget_clip_bounds_kappa():
    # Delta = 0 so A~ = A; step 0 |A| = 1, step 1 |A| = 0.1 -> M_bar = 0.55,
    # kappa_0 = 0.55 / 1 = 0.55, kappa_1 = 0.55 / 0.1 = 5.5 -> clipped to C = 2
    adv = torch.tensor([[1.0, 1.0, 0.1, 0.1]])
    out = shape_advantages(adv, torch.zeros(1, 4), torch.tensor([[0, 0, 1, 1]]), torch.ones(1, 4),
                           alpha_clip=0.2, lam=0.5, budget_clip=2.0)
    close(out, [[0.55, 0.55, 0.2, 0.2]])


def test_zero_delta_gives_input_exactly():
    torch.manual_seed(0)
    adv = torch.randn(3, 7)
    step_ids = torch.randint(-1, 3, (3, 7))
    out = shape_advantages(adv, torch.zeros(3, 7), step_ids, torch.ones(3, 7), alpha_clip=0.2,
                           lam=0.3, budget_clip=None)
    assert torch.equal(out, adv)


def test_sign_preserved_and_bounded_on_random_inputs():
    torch.manual_seed(0)
    lam, alpha = 0.7, 0.2
    for weight_fn in ("sigmoid", "exp"):
        adv = torch.randn(8, 16)
        delta = 3.0 * torch.randn(8, 16)
        step_ids = torch.randint(-1, 3, (8, 16))
        out = shape_advantages(adv, delta, step_ids, torch.ones(8, 16), alpha_clip=alpha, lam=lam,
                               weight_fn=weight_fn, budget_clip=None)
        assert torch.equal(torch.sign(out), torch.sign(adv))
        assert ((out / adv - 1.0).abs() <= lam * alpha + 1e-6).all()
        assert (out != adv).any()  # it did something


def test_negative_advantage_blames_the_disliked_step_more():
    # A = -1 on two steps; the teacher dislikes step 0 (Delta = -1) and likes step 1 (Delta = +1).
    # sign(A) Delta = +1, -1 -> w_raw = 2 sigma(1) = 1.462117 -> 1.2, 2 sigma(-1) = 0.537883 -> 0.8
    # lam 1 -> A~ = -1.2 (more blame), -0.8 (less)
    out = shape_advantages(torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, 1.0]]),
                           torch.tensor([[0, 1]]), torch.ones(1, 2), alpha_clip=0.2, lam=1.0,
                           budget_clip=None)
    close(out, [[-1.2, -0.8]])


def test_exp_weight_fn():
    # A = +1, Delta = 0.1 -> e^0.1 = 1.105171 (inside [0.8, 1.2]); A = -1, Delta = -0.1 ->
    # sign(A) Delta = 0.1 -> -1.105171; A = +1, Delta = 0.5 -> e^0.5 = 1.648721 -> 1.2;
    # A = 0 -> 0. lam 1.
    out = shape_advantages(torch.tensor([[1.0, -1.0, 1.0, 0.0]]),
                           torch.tensor([[0.1, -0.1, 0.5, 3.0]]), torch.tensor([[0, 1, 2, 3]]),
                           torch.ones(1, 4), alpha_clip=0.2, lam=1.0, weight_fn="exp",
                           budget_clip=None)
    close(out, [[1.1051709, -1.1051709, 1.2, 0.0]])


# ---------------------------------------------------------------------------- Eq. 10-12, layouts
def step_per_row_batch(k_of_row):
    # rows 0, 1: trajectory 5 (A = +1), steps k_of_row[0], k_of_row[1]; row 2: trajectory 2
    # (A = -1), one step. Token 0 of every row is off target (reasoning), tokens 1-2 the action.
    adv = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    delta = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    step_ids = torch.tensor([[-1, k_of_row[0], k_of_row[0]], [-1, k_of_row[1], k_of_row[1]],
                             [-1, 0, 0]])
    return adv, delta, step_ids, torch.ones(3, 3), torch.tensor([5, 5, 2])


@pytest.mark.parametrize("k_of_row", [(0, 1), (0, 0)])
def test_step_per_row_layout_with_traj_ids(k_of_row):
    adv, delta, step_ids, mask, traj = step_per_row_batch(k_of_row)
    # lam 1, alpha 0.2: row 0 Delta 1 -> 2 sigma(1) = 1.462 -> 1.2; row 1 Delta 0 -> 1;
    # row 2: sign(A) Delta = +1 -> 1.2 -> -1.2, Delta 0 -> -1.
    no_budget = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.2, lam=1.0,
                                 budget_clip=None, traj_ids=traj)
    close(no_budget, [[1.0, 1.2, 1.2], [1.0, 1.0, 1.0], [-1.0, -1.2, -1.0]])
    # budget, trajectory 5 has two steps (its rows): M_0 = 1.2, M_1 = 1, M_bar = 1.1,
    # kappa_0 = 1.1/1.2 = 0.916667 -> 1.1, kappa_1 = 1.1/1 = 1.1 -> 1.1; reasoning tokens keep 1.
    # Trajectory 2 has one step -> no budget. Rows are steps even if both are labelled k = 0.
    out = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.2, lam=1.0, budget_clip=2.0,
                           traj_ids=traj)
    close(out, [[1.0, 1.1, 1.1], [1.0, 1.1, 1.1], [-1.0, -1.2, -1.0]])
    # traj_ids None: every row is its own trajectory with one step -> budget changes nothing
    alone = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.2, lam=1.0, budget_clip=2.0)
    assert torch.equal(alone, no_budget)


def test_budget_skips_trajectories_with_fewer_than_two_target_steps():
    # Row 0: one step only. Row 1: two spans, but step 1's tokens all have mask 0 -> one step
    # with targets. Both rows are left as Eq. 8 made them.
    adv = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    delta = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    step_ids = torch.tensor([[0, 0, -1, -1], [0, 0, 1, 1]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    kw = dict(alpha_clip=0.2, lam=0.5)
    assert torch.equal(shape_advantages(adv, delta, step_ids, mask, budget_clip=2.0, **kw),
                       shape_advantages(adv, delta, step_ids, mask, budget_clip=None, **kw))


def test_lambda_zero_is_bitwise_grpo_even_with_budget():
    torch.manual_seed(1)
    adv = torch.randn(4, 6)
    delta = torch.randn(4, 6)
    step_ids = torch.randint(-1, 3, (4, 6))
    mask = torch.randint(0, 2, (4, 6)).float()
    adv = adv * mask
    out = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.2, lam=0.0, budget_clip=2.0)
    assert torch.equal(out, adv)
    # Gradient identity: the PPO loss on the lam = 0 advantages is the plain GRPO loss.
    old = torch.randn(4, 6)
    logp_a = (old + 0.3 * torch.randn(4, 6)).requires_grad_(True)
    logp_b = logp_a.detach().clone().requires_grad_(True)
    loss_grpo = policy_loss(logp_a, old, adv, mask)
    loss_step = policy_loss(logp_b, old, out, mask)
    loss_grpo.backward()
    loss_step.backward()
    assert torch.equal(loss_grpo, loss_step)
    assert torch.equal(logp_a.grad, logp_b.grad)


# ---------------------------------------------------------------------------- knobs
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(alpha_clip=0.0), "alpha_clip"),
        (dict(alpha_clip=1.5), "alpha_clip"),
        (dict(lam=-0.1), "lam"),
        (dict(lam=1.1), "lam"),
        (dict(weight_fn="tanh"), "weight_fn"),
        (dict(budget_clip=0.5), "budget_clip"),
    ],
)
def test_shape_advantages_rejects_bad_knobs(kw, match):
    args = dict(alpha_clip=0.2, lam=0.5, weight_fn="sigmoid", budget_clip=2.0) | kw
    with pytest.raises(ValueError, match=match):
        shape_advantages(A1, D1, S1, M1, **args)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(alpha_clip=0.0), "alpha_clip"),
        (dict(lam0=2.0), "lam"),
        (dict(decay_steps=0), "decay_steps"),
        (dict(weight_fn="softplus"), "weight_fn"),
        (dict(budget_clip=0.9), "budget_clip"),
        (dict(teacher_refresh=-1), "teacher_refresh"),
        (dict(target_span="action"), "target_span"),
        (dict(peer_budget_tokens=0), "peer_budget_tokens"),
    ],
)
def test_config_validates_itself(kw, match):
    with pytest.raises(ValueError, match=match):
        StepOPSDConfig(**kw)


def test_config_defaults():
    cfg = StepOPSDConfig()
    assert (cfg.alpha_clip, cfg.lam0, cfg.decay_steps, cfg.weight_fn, cfg.budget_clip,
            cfg.teacher_refresh, cfg.target_span, cfg.peer_budget_tokens) == (
        0.2, 0.2, 50, "sigmoid", 2.0, 10, "action_only", 512)
    StepOPSDConfig(decay_steps=None, budget_clip=None, teacher_refresh=0)  # the off switches


def test_budget_matches_a_loop_reference_on_random_batches():
    # Eq. 10-12 written as plain loops over trajectories and steps, against the vectorised form.
    torch.manual_seed(2)
    for _ in range(20):
        b, t = 6, 9
        adv = torch.randn(b, t)
        delta = torch.randn(b, t)
        step_ids = torch.randint(-1, 4, (b, t))
        mask = (torch.rand(b, t) < 0.8).float()
        traj = torch.randint(0, 3, (b,))
        shaped = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.3, lam=0.6,
                                  budget_clip=None)
        out = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.3, lam=0.6, budget_clip=1.5,
                               traj_ids=traj)
        ref = shaped.clone()
        for tr in traj.unique().tolist():
            spans = {}  # (row, k) -> mean |A~| over its mask-1 tokens
            for row in (traj == tr).nonzero().flatten().tolist():
                for k in step_ids[row].unique().tolist():
                    sel = (step_ids[row] == k) & (mask[row] > 0)
                    if k >= 0 and sel.any():
                        spans[(row, k)] = shaped[row][sel].abs().mean().item()
            if len(spans) < 2:
                continue
            m_bar = sum(spans.values()) / len(spans)
            for (row, k), m_k in spans.items():
                kappa = min(max(m_bar / (m_k + 1e-6), 1 / 1.5), 1.5)
                ref[row][step_ids[row] == k] = shaped[row][step_ids[row] == k] * kappa
        close(out, ref, tol=1e-5)


def test_step_per_row_budget_erases_step_differences_and_keeps_the_within_step_split():
    """Spec §10 in the step-per-row layout (issue 10's note): every row of a trajectory carries the same A_i, so
    Eq. 10-12 give every step the same mean |A^| -- the step-to-step differences Eq. 6-8 made are erased -- and
    kappa never reaches its clip (|A~/A - 1| <= lam * alpha_clip = 0.04 at the defaults, far inside [1/C, C]);
    only the split among a step's tokens survives. One trajectory, A = 1, three steps (rows) of two target tokens,
    defaults lam = 0.2, alpha_clip = 0.2 (big |Delta| saturates w at 1 +- 0.2):
      step 0: Delta (+9, +9) -> w (1.2, 1.2) -> A~ = 1 + 0.2*0.2 = (1.04, 1.04),  M_0 = 1.04
      step 1: Delta (0, 0)   -> A~ = (1, 1),                                       M_1 = 1
      step 2: Delta (-9, 0)  -> w (0.8, 1) -> A~ = (0.96, 1),                      M_2 = 0.98
      M_bar = 3.02 / 3 = 1.006667; kappa = M_bar / M_k = (0.967949, 1.006667, 1.027211)
      A^ = kappa_k * A~ = (1.006667, 1.006667), (1.006667, 1.006667), (0.986122, 1.027211): every step's mean is M_bar."""
    adv = torch.ones(3, 2)
    delta = torch.tensor([[9.0, 9.0], [0.0, 0.0], [-9.0, 0.0]])
    step_ids, mask, traj = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), torch.zeros(3, dtype=torch.long)
    off = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.2, lam=0.2, budget_clip=None, traj_ids=traj)
    close(off, [[1.04, 1.04], [1.0, 1.0], [0.96, 1.0]])
    on = shape_advantages(adv, delta, step_ids, mask, alpha_clip=0.2, lam=0.2, budget_clip=2.0, traj_ids=traj)
    close(on, [[1.006667, 1.006667], [1.006667, 1.006667], [0.986122, 1.027211]])
    close(on.mean(1), [1.006667] * 3)  # the step-to-step differences are gone
    close(on[2, 0] / on[2, 1], off[2, 0] / off[2, 1])  # the within-step split (0.96 : 1) survives
    # random gaps, several trajectories of both signs: per-step mean |A^| equal within each trajectory
    g = torch.Generator().manual_seed(0)
    rows, tokens = 12, 5
    adv = torch.tensor([1.3] * 4 + [-0.7] * 4 + [0.4] * 4)[:, None].expand(rows, tokens).contiguous()
    traj = torch.arange(rows) // 4
    delta = torch.randn(rows, tokens, generator=g) * 3
    on = shape_advantages(adv, delta, torch.zeros(rows, tokens, dtype=torch.long), torch.ones(rows, tokens),
                          alpha_clip=0.2, lam=0.2, budget_clip=2.0, traj_ids=traj)
    means = on.abs().mean(1).view(3, 4)
    close(means, means[:, :1].expand(3, 4))
    off = shape_advantages(adv, delta, torch.zeros(rows, tokens, dtype=torch.long), torch.ones(rows, tokens),
                           alpha_clip=0.2, lam=0.2, budget_clip=None, traj_ids=traj)
    kappa = on / off
    assert kappa.min() > 1 / 1.05 and kappa.max() < 1.05  # far from the clip 1/C = 0.5, C = 2
    assert (off.abs().mean(1).view(3, 4).std(1) > 1e-3).all()  # without the budget the steps did differ


def test_the_budget_over_a_step_level_base_equalises_the_multiplier_not_the_credit():
    """One trajectory, two steps of two target tokens; a GiGPO-like base gives step 0 A = 2 and step 1 A = 0.5;
    Δ = 0, so w = 2σ(0) = 1 and Ã = A. On |Ã| (Eq. 10): M = (2, 0.5), M̄ = 1.25, κ = (0.625, clip(2.5) = 2):
    Â = (1.25, 1.0), the base's credit erased. On the multiplier |Ã / A| = 1 everywhere: κ = 1, Â = A."""
    adv = torch.tensor([[2.0, 2.0], [0.5, 0.5]])
    step_ids = torch.tensor([[0, 0], [1, 1]])
    mask, delta, traj = torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([0, 0])
    knobs = dict(alpha_clip=0.2, lam=0.5, budget_clip=2.0, traj_ids=traj)
    on_adv = shape_advantages(adv, delta, step_ids, mask, **knobs)
    assert torch.allclose(on_adv, torch.tensor([[1.25, 1.25], [1.0, 1.0]]), atol=1e-5)
    on_mult = shape_advantages(adv, delta, step_ids, mask, budget_on="multiplier", **knobs)
    assert torch.allclose(on_mult, adv)
    # a teacher that moves step 1 only: Δ = +10 there, w = 1.2, multiplier 1 + 0.5 * 0.2 = 1.1 on step 1;
    # M = (1, 1.1), M̄ = 1.05, κ = (1.05, 1.05 / 1.1): Â = (2.1, 0.5 * 1.1 * 1.05 / 1.1 = 0.525)
    moved = shape_advantages(adv, torch.tensor([[0.0, 0.0], [10.0, 10.0]]), step_ids, mask, budget_on="multiplier", **knobs)
    assert torch.allclose(moved, torch.tensor([[2.1, 2.1], [0.525, 0.525]]), atol=1e-5)
    with pytest.raises(ValueError, match="budget_on='steps'"):
        shape_advantages(adv, delta, step_ids, mask, budget_on="steps", **knobs)
