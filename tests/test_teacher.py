"""The teacher (`stepopsd.teacher`, Eq. 4-12): rescoring a batch's advantages with the hindsight-conditioned teacher
(lambda = 0 is GRPO and never runs the teacher; otherwise shaped within its bounds, sign kept, target tokens only),
the teacher's target-token log-probs against a direct computation, and the teacher snapshot's refresh and state.

On-policy trajectories of a one-layer tiny Qwen3 on a word tokenizer (`helpers.records`).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.hindsight import hindsight_blocks, teacher_inputs
from stepopsd.policy.logprobs import sequence_logprobs
from stepopsd.policy.tiny import build_tiny_policy
from stepopsd.teacher import TeacherSnapshot, rescore, teacher_target_logprobs

from helpers.records import TINY, fresh_batch, model, onpolicy_trajs, tok  # noqa: F401  (fixtures)
from helpers.updates import Boom
from helpers.updates import params_equal as _params_equal


def test_rescore_lambda_zero_is_grpo_without_teacher(tok, onpolicy_trajs):
    batch = fresh_batch(tok, onpolicy_trajs)
    shaped, metrics = rescore(batch, Boom(), tok, StepOPSDConfig(lam0=0.0), 0, pad_id=tok.pad_token_id)
    assert torch.equal(shaped, batch.advantages) and shaped is not batch.advantages
    assert metrics["stepopsd/lambda"] == 0.0
    # lambda decayed to zero (t >= T_decay) is the same
    shaped, _ = rescore(batch, Boom(), tok, StepOPSDConfig(lam0=0.2, decay_steps=5), 7, pad_id=tok.pad_token_id)
    assert torch.equal(shaped, batch.advantages)


@pytest.mark.parametrize("budget", [None, 2.0])
def test_rescore_shapes_within_bounds(tok, model, onpolicy_trajs, budget):
    batch = fresh_batch(tok, onpolicy_trajs)
    ids_before, adv_before = batch.input_ids.clone(), batch.advantages.clone()
    cfg = StepOPSDConfig(lam0=0.2, alpha_clip=0.2, budget_clip=budget)
    lam, alpha = 0.2, 0.2
    shaped, metrics = rescore(batch, model, tok, cfg, 0, pad_id=tok.pad_token_id)
    adv = batch.advantages
    assert torch.equal(batch.input_ids, ids_before) and torch.equal(adv, adv_before)  # rescore mutates nothing
    assert torch.equal(torch.sign(shaped), torch.sign(adv))  # sign kept everywhere (zeros stay zero)
    nz = adv != 0
    ratio = shaped[nz] / adv[nz]
    if budget is None:
        assert ((ratio - 1).abs() <= lam * alpha + 1e-6).all()  # |A~/A - 1| <= lambda * alpha
    else:
        assert (ratio <= budget * (1 + lam * alpha) + 1e-6).all() and (ratio >= (1 - lam * alpha) / budget - 1e-6).all()
    target = (batch.step_ids >= 0) & (batch.loss_mask > 0)
    assert torch.equal(shaped[~target], adv[~target])  # off-target tokens keep A exactly
    assert (shaped[target & nz] != adv[target & nz]).any()  # the teacher did act somewhere
    keys = {"stepopsd/lambda", "stepopsd/target_token_frac", "stepopsd/delta_mean", "stepopsd/step_score_mean",
            "stepopsd/step_sign_agreement", "stepopsd/shaped_token_frac", "stepopsd/abs_ratio_dev"}
    assert keys <= set(metrics) and all(math.isfinite(metrics[k]) for k in keys)
    assert metrics["stepopsd/lambda"] == pytest.approx(lam)
    assert metrics["stepopsd/target_token_frac"] == pytest.approx((target.sum() / batch.loss_mask.sum()).item())

    # the student log-probs default to the rollout's
    blocks = hindsight_blocks(batch.trajectories, tok, peer_budget=cfg.peer_budget_tokens)
    teacher = teacher_target_logprobs(model, batch, blocks, tok, pad_id=tok.pad_token_id)
    delta_mean = (teacher - batch.rollout_logp)[target].mean().item()
    assert metrics["stepopsd/delta_mean"] == pytest.approx(delta_mean, abs=1e-6)
    explicit, _ = rescore(batch, model, tok, cfg, 0, pad_id=tok.pad_token_id, student_logp=batch.rollout_logp)
    assert torch.equal(explicit, shaped)
    other, m2 = rescore(batch, model, tok, cfg, 0, pad_id=tok.pad_token_id, student_logp=batch.rollout_logp - 5.0)
    assert not torch.equal(other, shaped)
    assert m2["stepopsd/delta_mean"] == pytest.approx(delta_mean + 5, abs=1e-4)


def test_teacher_target_logprobs_match_direct_computation(tok, model, onpolicy_trajs):
    batch = fresh_batch(tok, onpolicy_trajs)
    blocks = hindsight_blocks(batch.trajectories, tok)
    ti = teacher_inputs(batch.step_ids, batch.input_ids, batch.row_traj, blocks, tok, pad_id=tok.pad_token_id)
    expected = torch.zeros(batch.input_ids.shape)
    with torch.no_grad():
        for i, r in enumerate(ti.rows.tolist()):
            n = int(ti.attention_mask[i].sum())
            lp = sequence_logprobs(model, ti.input_ids[i:i + 1, :n], ti.attention_mask[i:i + 1, :n])[0]
            valid = ti.target_pos[i] >= 0
            expected[r, ti.batch_pos[i][valid]] = lp[ti.target_pos[i][valid]]
    for micro in (1, 3, 16):  # unpadded one by one, and right-padded micro-batches
        got = teacher_target_logprobs(model, batch, blocks, tok, pad_id=tok.pad_token_id, micro_batch=micro)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    target = batch.step_ids >= 0
    assert got[~target].eq(0).all() and (got[target] < 0).all()
    assert not got.requires_grad


def test_teacher_snapshot_refresh_and_state(tok):
    policy = build_tiny_policy(tok, seed=1, **TINY)
    snap = TeacherSnapshot(policy, refresh=3)
    assert snap.model is not policy and snap.taken_at == 0 and not snap.model.training
    assert not any(p.requires_grad for p in snap.model.parameters())
    old = copy.deepcopy(snap.model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    assert not snap.maybe_refresh(policy, 1) and not snap.maybe_refresh(policy, 2)
    assert _params_equal(snap.model, old) and not _params_equal(snap.model, policy)
    assert snap.maybe_refresh(policy, 3) and snap.taken_at == 3
    assert _params_equal(snap.model, policy)
    assert not snap.maybe_refresh(policy, 5) and snap.maybe_refresh(policy, 6) and snap.taken_at == 6

    state = copy.deepcopy(snap.state_dict())
    other = TeacherSnapshot(build_tiny_policy(tok, seed=2, **TINY), refresh=3)
    assert not _params_equal(other.model, snap.model)
    other.load_state_dict(state)
    assert other.taken_at == 6 and _params_equal(other.model, snap.model)

    live = TeacherSnapshot(policy, refresh=0)
    assert live.model is policy
    assert not live.maybe_refresh(policy, 100) and live.taken_at == 0
    assert live.state_dict() == {"taken_at": 0, "weights": None}
    live.load_state_dict({"taken_at": 4, "weights": None})
    assert live.taken_at == 4 and live.model is policy
