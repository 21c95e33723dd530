"""The update's log-prob checks (`stepopsd.module.GRPOModule`): a rollout whose log-probs differ from the trainer's
is refused before any update, and truncated importance sampling (`ppo.rollout_is_cap`) recomputes pi_old and
weights the engine's drift; a cap below one is rejected.

On-policy trajectories of a one-layer tiny Qwen3 on a word tokenizer (`helpers.records`), one CPU Trainer step.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from stepopsd.module import GRPOModule, PPOConfig

from helpers.records import fresh_batch, model, onpolicy_trajs, tok  # noqa: F401  (fixtures)
from helpers.updates import PPO
from helpers.updates import fit_one_batch as _fit
from helpers.updates import params_equal as _params_equal


def test_training_step_rejects_off_policy_logprobs(tok, model, onpolicy_trajs):
    batch = fresh_batch(tok, onpolicy_trajs)
    shifted = dataclasses.replace(batch, rollout_logp=batch.rollout_logp + batch.loss_mask)  # +1.0 per response token
    policy = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="log-probs differ"):
        _fit(policy, shifted, PPOConfig(**PPO))
    assert _params_equal(policy, model)  # nothing was updated


def test_truncated_importance_sampling_recomputes_pi_old_and_weights_the_drift(tok, model, onpolicy_trajs):
    """ppo.rollout_is_cap: pi_old is the trainer's own (recomputed over the whole batch, in the rollout's layout),
    the logged gap is the engine's drift, and with no drift the update is exactly the plain one."""
    batch = fresh_batch(tok, onpolicy_trajs)
    module = GRPOModule(copy.deepcopy(model), PPOConfig(**PPO, rollout_is_cap=2.0))
    recomputed = module.trainer_logprobs(batch)
    assert recomputed.shape == batch.rollout_logp.shape
    assert torch.allclose(recomputed, batch.rollout_logp, atol=1e-5)  # the rollout was on-policy
    assert torch.equal(recomputed * (1 - batch.loss_mask), torch.zeros_like(recomputed))

    plain, tis = copy.deepcopy(model), copy.deepcopy(model)
    _fit(plain, batch, PPOConfig(**PPO))
    trainer = _fit(tis, batch, PPOConfig(**PPO, rollout_is_cap=2.0))
    assert float(trainer.callback_metrics["rollout/is_weight_mean"]) == pytest.approx(1.0, abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.parameters(), tis.parameters()))

    # an engine 0.004 nats per token off: within the threshold, weights exp(-0.004) on every token
    drift = dataclasses.replace(batch, rollout_logp=batch.rollout_logp + 0.004 * batch.loss_mask)
    trainer = _fit(copy.deepcopy(model), drift, PPOConfig(**PPO, rollout_is_cap=2.0))
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/logp_gap_mean"]) == pytest.approx(0.004, abs=1e-4)
    assert float(metrics["rollout/is_weight_mean"]) == pytest.approx(math.exp(-0.004), abs=1e-4)
    assert float(metrics["rollout/is_truncated_fraction"]) == 0.0


def test_rollout_is_cap_below_one_is_rejected():
    with pytest.raises(ValueError, match="rollout_is_cap=0.5"):
        PPOConfig(rollout_is_cap=0.5)
