"""The reward manager (`stepopsd.data.batch.build_batch`): from trajectories to the typed `RolloutBatch`.

Outcome rewards and success per trajectory, the advantages left at zero for the advantage stage (the GRPO
estimator's Eq. 1 on this batch checked by hand), the step-per-row layout (prompt +
response rows, loss mask, rollout log-probs, step ids on each target span), `rows(index)`, and failed engines: left
out and counted, their group normalised over its survivors or dropped when fewer than two remain.

Hand-made trajectories on a word tokenizer (`helpers.records`), no engine and no model.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stepopsd.data.batch import build_batch
from stepopsd.spans import decode

from helpers.batches import with_advantages
from helpers.records import tok, two_groups  # noqa: F401  (tok: a fixture)


def test_build_batch_rewards_advantages_and_layout(tok):
    trajs = two_groups(tok)
    batch, metrics = build_batch(trajs, pad_id=tok.pad_token_id)
    assert not batch.advantages.any() and not batch.traj_adv.any()  # the advantage stage fills them
    with_advantages(batch, "grpo")
    kept = [t for t in trajs if not t.failed]
    assert batch.trajectories == tuple(kept) and metrics["rollout/failed_trajectories"] == 1
    # R_i = sum of step rewards: 10 - 0.1 (win with one invalid step), 0, -0.1, 0
    torch.testing.assert_close(batch.traj_reward, torch.tensor([9.9, 0.0, -0.1, 0.0]))
    assert batch.traj_success.tolist() == [True, False, False, False]
    assert batch.traj_group.tolist() == [0, 0, 1, 1]
    # Eq. 1 with the unbiased std (the failed member of group 1 is not counted):
    #   group 0: mean 4.95, deviations +-4.95, var = 2 * 4.95^2 / (2 - 1), std = 4.95 * sqrt(2) = 7.000357
    #            A = +-4.95 / (7.000357 + 1e-6) = +-0.7071067 (1/sqrt(2) up to eps)
    #   group 1: mean -0.05, deviations -+0.05, std = 0.05 * sqrt(2) = 0.0707107
    #            A = -+0.05 / (0.0707107 + 1e-6) = -+0.7070968
    a0 = 4.95 / (4.95 * math.sqrt(2) + 1e-6)
    a1 = 0.05 / (0.05 * math.sqrt(2) + 1e-6)
    torch.testing.assert_close(batch.traj_adv, torch.tensor([a0, -a0, -a1, a1]), atol=1e-5, rtol=0)
    assert a0 == pytest.approx(1 / math.sqrt(2), abs=1e-6) and a1 == pytest.approx(0.7070968, abs=1e-6)
    assert metrics["reward/mean"] == pytest.approx((9.9 - 0.1) / 4, abs=1e-6)
    assert metrics["success/rate"] == pytest.approx(0.25)
    assert metrics["grpo/uniform_group_frac"] == 0.0
    assert metrics["rollout/steps_per_traj"] == pytest.approx(10 / 4)
    assert metrics["rollout/invalid_step_frac"] == pytest.approx(2 / 10)

    rows = [(m, k, s) for m, t in enumerate(kept) for k, s in enumerate(t.steps)]
    assert batch.num_rows == len(rows) == 10
    assert batch.row_traj.tolist() == [m for m, _, _ in rows] and batch.row_step.tolist() == [k for _, k, _ in rows]
    for r, (m, k, s) in enumerate(rows):
        p, q = len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids)
        assert batch.prompt_lens[r] == p
        assert batch.input_ids[r, :q].tolist() == list(s.prompt_ids + s.response_ids)
        assert batch.input_ids[r, q:].eq(tok.pad_token_id).all()
        assert batch.attention_mask[r, :q].eq(1).all() and batch.attention_mask[r, q:].eq(0).all()
        expect_mask = torch.zeros(batch.input_ids.shape[1])
        expect_mask[p:q] = 1
        assert torch.equal(batch.loss_mask[r], expect_mask)  # response tokens only
        assert torch.equal(batch.advantages[r], batch.traj_adv[m] * expect_mask)  # A_i on the mask, 0 elsewhere
        assert batch.advantages[r, p:q].eq(batch.traj_adv[m]).all()
        torch.testing.assert_close(batch.rollout_logp[r, p:q], torch.tensor(s.rollout_logprobs))
        assert batch.rollout_logp[r, :p].eq(0).all() and batch.rollout_logp[r, q:].eq(0).all()
        expect_steps = torch.full((batch.input_ids.shape[1],), -1)
        if s.target is not None:
            expect_steps[p + s.target[0]:p + s.target[1]] = k
            span = batch.input_ids[r, p + s.target[0]:p + s.target[1]].tolist()
            assert decode(tok, span) == f"<action>{s.transition.action}</action>"
        assert torch.equal(batch.step_ids[r], expect_steps)
    assert batch.step_ids[batch.row_traj == 0].max() == 3 and (batch.step_ids[2] == -1).all()  # invalid step 2

    # rows(index) trims to the longest selected row
    lengths = batch.attention_mask.sum(1)
    shortest = int(lengths.argmin())
    sub = batch.rows(torch.tensor([shortest]))
    assert sub["input_ids"].shape == (1, int(lengths[shortest]))
    assert set(sub) == {"input_ids", "attention_mask", "loss_mask", "rollout_logp", "advantages", "step_ids"}
    pair = batch.rows(torch.tensor([shortest, int(lengths.argmax())]))
    assert pair["attention_mask"].shape[1] == batch.input_ids.shape[1] == int(lengths.max())
    assert torch.equal(pair["advantages"][0], batch.advantages[shortest])


def test_build_batch_drops_a_group_left_with_one_member_and_normalises_the_rest_over_survivors(tok):
    """Group 0 of three members loses one: A over the two survivors (rewards 9.9 and 0: A = +-1/sqrt(2) up to
    eps, as in the layout test); group 1 keeps one of two: dropped (its lone A would be 0), counted."""
    g0 = two_groups(tok)[:2]
    g0 = [*g0, dataclasses.replace(g0[1], member=2, failed=True)]
    g1 = [dataclasses.replace(t, group=1, member=j) for j, t in enumerate(two_groups(tok)[:2])]
    g1[1] = dataclasses.replace(g1[1], failed=True)
    batch, metrics = build_batch(g0 + g1, pad_id=tok.pad_token_id)
    with_advantages(batch, "grpo")
    assert batch.traj_group.tolist() == [0, 0] and batch.trajectories == tuple(g0[:2])
    a0 = 4.95 / (4.95 * math.sqrt(2) + 1e-6)
    torch.testing.assert_close(batch.traj_adv, torch.tensor([a0, -a0]), atol=1e-5, rtol=0)
    assert metrics["rollout/failed_trajectories"] == 2 and metrics["rollout/dropped_groups"] == 1


def test_build_batch_all_failed_raises(tok):
    trajs = [dataclasses.replace(t, failed=True) for t in two_groups(tok)[:2]]
    with pytest.raises(RuntimeError, match="2 of 2 trajectories failed and no group kept two members"):
        build_batch(trajs, pad_id=tok.pad_token_id)
