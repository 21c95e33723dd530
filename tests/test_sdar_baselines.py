"""SDAR's self-distillation baselines (stepopsd/algorithms/distill.py, stepopsd/estimators/sdar.py), numbers by hand.

Gaps Δ = (0.5, −0.1, 2.0, −3.0) on four target tokens, ε_w = 0.2, λ = 0.5:
  A = +2:  exp(Δ) = (1.6487, 0.904837, 7.389, 0.0498) → w = (1.2, 0.904837, 1.2, 0.8)
           Â = 2 (0.5 + 0.5 w) = (2.2, 1.904837, 2.2, 1.8)
  A = −1:  exp(−Δ) = (0.6065, 1.105171, 0.1353, 20.09) → w = (0.8, 1.105171, 0.8, 1.2)
           Â = −(0.5 + 0.5 w) = (−0.9, −1.052585, −0.9, −1.1)
  A = 0:   sign 0 → w = 1 → Â = 0.
λ_k = 0.5 (1 − k / 100): k = 1 → 0.495, k = 50 → 0.25, k ≥ 100 → 0.
Gate β = 5: σ(2.5) = 0.924142, σ(−0.5) = 0.377541, σ(10) = 0.9999546, σ(−15) = 3.059e−7; β = 0: 1/2.
"""
import copy
import math

import pytest
import torch

from stepopsd.algorithms.distill import (DistillTerm, rlsd_advantages, rlsd_lambda, rlsd_weights, sdar_gate,
                                         sdar_token_loss)
from stepopsd.estimators import Context, build_estimator
from stepopsd.module import GRPOModule, PPOConfig

from helpers.batches import batch_of, synthetic_batch
from helpers.tiny_policy import tiny, tok  # noqa: F401  fixtures
from helpers.updates import Boom

DELTA = torch.tensor([[0.5, -0.1, 2.0, -3.0]])


def test_rlsd_weights_and_advantages_by_hand():
    w = rlsd_weights(torch.full((1, 4), 2.0), DELTA, 0.2)
    assert torch.allclose(w, torch.tensor([[1.2, math.exp(-0.1), 1.2, 0.8]]))
    target = torch.tensor([[True, True, True, True]])
    up = rlsd_advantages(torch.full((1, 4), 2.0), DELTA, target, lam=0.5, eps_w=0.2)
    assert torch.allclose(up, torch.tensor([[2.2, 1.904837, 2.2, 1.8]]), atol=1e-6)
    down = rlsd_advantages(torch.full((1, 4), -1.0), DELTA, target, lam=0.5, eps_w=0.2)
    assert torch.allclose(down, torch.tensor([[-0.9, -1.052585, -0.9, -1.1]]), atol=1e-6)
    assert torch.equal(rlsd_advantages(torch.zeros(1, 4), DELTA, target, lam=0.5, eps_w=0.2), torch.zeros(1, 4))
    off = rlsd_advantages(torch.full((1, 4), 2.0), DELTA, torch.tensor([[True, False, False, True]]), lam=0.5, eps_w=0.2)
    assert torch.allclose(off, torch.tensor([[2.2, 2.0, 2.0, 1.8]]))  # off the target span: A itself
    assert torch.equal(rlsd_advantages(torch.full((1, 4), 2.0), DELTA, target, lam=0.0, eps_w=0.2), torch.full((1, 4), 2.0))


def test_rlsd_lambda_warms_down_linearly():
    assert [rlsd_lambda(k, 0.5, 100) for k in (1, 50, 99, 100, 150)] == pytest.approx([0.495, 0.25, 0.005, 0.0, 0.0])
    assert rlsd_lambda(7, 0.5, 0) == 0.5  # no warm-down


def test_sdar_gate_and_its_gradient_by_hand():
    teacher, student = DELTA.clone(), torch.zeros(1, 4, requires_grad=True)
    g = sdar_gate(teacher, student, 5.0)
    assert torch.allclose(g, torch.tensor([[0.924142, 0.377541, 0.9999546, 3.059e-7]]), atol=1e-6)
    assert torch.equal(sdar_gate(teacher, student, 0.0), torch.full((1, 4), 0.5))
    loss = sdar_token_loss(teacher, student, 5.0).sum()
    assert loss.item() == pytest.approx(0.924142 * 0.5 - 0.377541 * 0.1 + 0.9999546 * 2.0 - 3.059e-7 * 3.0, abs=1e-5)
    loss.backward()
    assert torch.allclose(student.grad, -g)  # −g_t ∇ log π_θ: the teacher acts through the gate only


def test_the_module_adds_the_term_with_the_surrogates_normaliser(tiny, tok):
    """pg_coef 0, coef 1, no KL or entropy: the loss is Σ_target g (lpT − lpS) / (loss tokens), with lpS the
    module's own log-probs."""
    policy = tiny
    batch = synthetic_batch(len(tok), [(5, 4), (3, 6)], seed=1)
    batch.step_ids = torch.where(batch.loss_mask > 0, 0, -1)
    batch.step_ids[0, 5] = -1  # one response token outside the target span: no term there
    teacher_logp = (-torch.rand(batch.input_ids.shape) * 3) * batch.loss_mask
    module = GRPOModule(copy.deepcopy(policy), PPOConfig(kl_coef=0.0, entropy_coef=0.0, mini_batch_rows=2))
    rows = {**batch.rows(torch.arange(2)), "teacher_logp": teacher_logp}
    loss, parts = module.mini_batch_loss(rows, distill=DistillTerm(coef=1.0, gate_beta=5.0, pg_coef=0.0))
    logp, tail = parts["logp"], parts["tail"]
    target = (tail["step_ids"] >= 0) & (tail["loss_mask"] > 0)
    lpt = tail["teacher_logp"]
    expect = (torch.sigmoid(5 * (lpt - logp)) * (lpt - logp))[target].sum() / tail["loss_mask"].sum()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert target.sum() == tail["loss_mask"].sum() - 1
    assert parts["distill_loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    plain, _ = module.mini_batch_loss(batch.rows(torch.arange(2)))
    assert plain.item() == pytest.approx(parts["pg_loss"].item())  # without the term: the surrogate alone


@pytest.mark.parametrize("name, coef, beta, pg", [("sdar", 0.01, 5.0, 1.0), ("opsd", 0.01, 5.0, 0.0),
                                                   ("grpo_opsd", 0.01, 0.0, 1.0)])
def test_the_sdar_family_defaults_are_sdars_scripts(name, coef, beta, pg):
    est = build_estimator({"name": name})
    assert (est.knobs.coef, est.knobs.gate_beta, est.knobs.pg_coef, est.knobs.teacher_refresh) == (coef, beta, pg, 0)
    assert est.base.name == "grpo"


def test_rlsd_with_lambda_zero_is_exactly_its_base_and_runs_no_teacher():
    batch = batch_of([10.0, 0.0, 0.0, 4.0], [0, 0, 1, 1])
    for base in ("grpo", "drgrpo", "rloo"):
        est = build_estimator({"name": "rlsd", "base": base, "rlsd": {"lam0": 0.0}})
        est.teacher = None  # would fail if touched
        out = est.advantages(batch, Context(step=0, policy=Boom()))
        ref = build_estimator({"name": base}).advantages(batch, Context(step=0))
        assert torch.equal(out.tokens, ref.tokens)
    past = build_estimator({"name": "rlsd", "rlsd": {"warmdown_steps": 100}})
    past.teacher = None
    assert torch.equal(past.advantages(batch, Context(step=99)).tokens,  # k = 100: λ = 0
                       build_estimator({"name": "grpo"}).advantages(batch, Context(step=0)).tokens)


@pytest.mark.parametrize("algorithm, match", [
    ({"name": "rlsd", "base": "stepopsd"}, "algorithm.base=stepopsd: RLSD reshapes another estimator's advantages"),
    ({"name": "sdar", "base": "rlsd"}, "algorithm.base=rlsd: SDAR reshapes"),
    ({"name": "stepopsd", "base": "sdar", "stepopsd": {}}, "algorithm.base=sdar: StepOPSD reshapes"),
    ({"name": "rlsd", "rlsd": {"eps_w": 1.5}}, "algorithm.rlsd: need"),
    ({"name": "sdar", "sdar": {"coef": 0.0, "pg_coef": 0.0}}, "nothing to train"),
    ({"name": "sdar", "sdar": {"gate_beta": -1}}, "algorithm.sdar: need"),
])
def test_bad_knobs_are_one_line(algorithm, match):
    with pytest.raises(ValueError, match=match) as e:
        build_estimator(algorithm)
    assert "\n" not in str(e.value)
