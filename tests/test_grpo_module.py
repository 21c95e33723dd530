"""The GRPO LightningModule's update (`stepopsd.module.GRPOModule`, Eq. 13-14): with lambda = 0 the StepOPSD loss
and gradients are GRPO's, one training step through Lightning (metrics, the advantage stage with StepOPSD), a
non-finite update skipped and counted (and too many in a row stop the run), and a batch the teacher cannot rescore
trained on plain GRPO advantages.

On-policy trajectories of a one-layer tiny Qwen3 on a word tokenizer (`helpers.records`), one CPU Trainer step.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.module import GRPOModule, NonFiniteError, PPOConfig
from stepopsd.teacher import rescore

from helpers.records import fresh_batch, model, onpolicy_trajs, tok  # noqa: F401  (fixtures)
from helpers.updates import PPO, Boom, stepopsd_stage
from helpers.updates import fit_one_batch as _fit
from helpers.updates import params_equal as _params_equal


def _loss_and_grads(policy, rows, ppo: PPOConfig):
    """The loss of one training_step mini-batch (Eq. 13-14), and every parameter's gradient."""
    module = GRPOModule(policy, ppo)
    policy.zero_grad(set_to_none=True)
    loss, _ = module.mini_batch_loss(rows)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in policy.parameters()]


def test_lambda_zero_loss_and_gradients_equal_grpo(tok, model, onpolicy_trajs):
    ppo = PPOConfig(**PPO)
    batch = fresh_batch(tok, onpolicy_trajs)
    shaped, _ = rescore(batch, Boom(), tok, StepOPSDConfig(lam0=0.0), 0, pad_id=tok.pad_token_id)
    policy = copy.deepcopy(model)
    index = torch.arange(batch.num_rows)
    plain_rows = batch.rows(index)
    loss_a, grads_a = _loss_and_grads(policy, plain_rows, ppo)
    loss_b, grads_b = _loss_and_grads(policy, dict(plain_rows, advantages=dataclasses.replace(batch, advantages=shaped)
                                                   .rows(index)["advantages"]), ppo)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert any(g.abs().sum() > 0 for g in grads_a)
    # lambda > 0 does change the update
    shaped2, _ = rescore(batch, model, tok, StepOPSDConfig(lam0=0.2, budget_clip=None), 0, pad_id=tok.pad_token_id)
    loss_c, _ = _loss_and_grads(policy, dict(plain_rows, advantages=dataclasses.replace(batch, advantages=shaped2)
                                             .rows(index)["advantages"]), ppo)
    assert not torch.equal(loss_a, loss_c)


def test_training_step_through_lightning(tok, model, onpolicy_trajs):
    ppo = PPOConfig(**PPO)
    policy = copy.deepcopy(model)
    trainer = _fit(policy, fresh_batch(tok, onpolicy_trajs), ppo)
    assert trainer.global_step == 1
    assert not _params_equal(policy, model)  # the update moved the weights
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/logp_gap_mean"]) < 1e-4  # on-policy rollout log-probs reproduced
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/clip_fraction", "time/update_s"):
        assert key in metrics and math.isfinite(float(metrics[key]))

    # through the advantage stage with StepOPSD at lambda = 0 the update is exactly GRPO's
    policy_cb = copy.deepcopy(model)
    _fit(policy_cb, fresh_batch(tok, onpolicy_trajs), ppo, callbacks=[stepopsd_stage(tok, lam0=0.0)])
    assert _params_equal(policy_cb, policy)


def test_a_non_finite_update_is_skipped_and_counted_and_too_many_in_a_row_stop_the_run(tok, model, onpolicy_trajs):
    """A NaN advantage (a broken reward or teacher) makes the loss and gradient NaN: AdamW would write NaN into
    every weight. The update is skipped (weights untouched), counted; with max_nonfinite_updates=1 the run stops
    with the one-line NonFiniteError."""
    batch = fresh_batch(tok, onpolicy_trajs)
    poisoned = dataclasses.replace(batch, advantages=batch.advantages * float("nan"))
    policy = copy.deepcopy(model)
    trainer = _fit(policy, poisoned, PPOConfig(**PPO))
    assert _params_equal(policy, model) and all(torch.isfinite(p).all() for p in policy.parameters())
    assert float(trainer.callback_metrics["actor/skipped_updates"]) == 1.0
    with pytest.raises(NonFiniteError, match="1 PPO updates in a row had a non-finite loss or gradient"):
        _fit(copy.deepcopy(model), poisoned, PPOConfig(**PPO, max_nonfinite_updates=1))
    trainer = _fit(copy.deepcopy(model), batch, PPOConfig(**PPO))  # the same batch, finite: updated, nothing skipped
    assert float(trainer.callback_metrics["actor/skipped_updates"]) == 0.0


def test_a_batch_the_teacher_cannot_rescore_trains_on_plain_grpo_advantages(tok, model, onpolicy_trajs):
    """A hindsight context longer than the teacher allows (max_position_embeddings cut to 16 here): that batch
    falls back to plain GRPO (the same update as algorithm=grpo), counted in stepopsd/rescoring_failed, no crash."""
    ppo = PPOConfig(**PPO)
    plain = copy.deepcopy(model)
    _fit(plain, fresh_batch(tok, onpolicy_trajs), ppo)
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = 16
    trainer = _fit(short, fresh_batch(tok, onpolicy_trajs), ppo, callbacks=[stepopsd_stage(tok, lam0=0.2)])
    assert float(trainer.callback_metrics["stepopsd/rescoring_failed"]) == 1.0
    assert _params_equal(short, plain)
    ok = copy.deepcopy(model)  # with the real limit the teacher rescored: another update
    trainer = _fit(ok, fresh_batch(tok, onpolicy_trajs), ppo, callbacks=[stepopsd_stage(tok, lam0=0.2)])
    assert float(trainer.callback_metrics["stepopsd/rescoring_failed"]) == 0.0 and not _params_equal(ok, plain)
