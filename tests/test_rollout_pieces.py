"""Rollout-to-update pieces: span alignment, hindsight contexts, the typed batch, teacher rescoring,
the teacher snapshot and the GRPO LightningModule (spec §5-§11).

Everything is built in-process: a word-level tokenizer trained on literal ALFWorld-protocol text, a
one-layer tiny Qwen3, and hand-made `StepRecord` / `Trajectory` records (no ALFWorld engine).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from stepopsd.algorithms.grpo import aggregate, policy_loss
from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.callbacks.rescoring import TeacherRescoring
from stepopsd.data.batch import RolloutBatch, build_batch
from stepopsd.envs.alfworld.prompts import action_span, format_response, parse_action, render_prompt, step_reward
from stepopsd.hindsight import alfworld_peer_lines, fit_from_front, hindsight_blocks, hindsight_text, teacher_inputs
from stepopsd.module import GRPOModule, NonFiniteError, PPOConfig
from stepopsd.policy.backends.base import Generation, SamplingParams
from stepopsd.policy.logprobs import sequence_logprobs
from stepopsd.policy.tiny import build_tiny_policy
from stepopsd.policy.tokenizer import train_word_tokenizer
from stepopsd.rollout import RolloutConfig, encode_prompt, rollout
from stepopsd.spans import decode, token_span
from stepopsd.teacher import TeacherSnapshot, rescore, teacher_target_logprobs
from stepopsd.types import EnvState, StepRecord, Task, Trajectory, Transition

from alfworld_text import ADMISSIBLE, GOAL, OBS  # noqa: E402

INVALID = "<think>i am not sure what to do here.</think> go to fridge 1"  # no action block: no target


def think(action: str) -> str:
    return f"my task is to put a clean mug in coffeemachine. next i should {action}."


def respond(action: str | None) -> str:
    return INVALID if action is None else format_response(think(action), action)


def corpus() -> list[str]:
    texts = []
    for k, obs in enumerate(OBS):
        history = [(OBS[j], ADMISSIBLE[j]) for j in range(k)]
        texts += [render_prompt(GOAL, obs, ADMISSIBLE, history, k, compact=c) for c in (False, True)]
    texts += [respond(a) for a in ADMISSIBLE] + [INVALID]
    peer = "\n".join(f"{k + 1}. {a}" for k, a in enumerate(ADMISSIBLE))
    texts += [hindsight_text(True), hindsight_text(False), hindsight_text(False, peer)]
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_word_tokenizer(corpus())


TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_policy(tok, seed=0, **TINY)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


TASK = Task("train/clean-mug/trial_0", "clean", "games/clean-mug/game.tw-pddl", "train", generated=True)


def make_step(tok, k: int, action: str | None, *, won: bool = False, policy=None) -> StepRecord:
    """Step k of a trajectory as the rollout would record it; log-probs from `policy` when given
    (on-policy), else made-up values."""
    history = [(OBS[j % len(OBS)], ADMISSIBLE[j]) for j in range(k)]
    prompt_ids, _ = encode_prompt(tok, render_prompt(GOAL, OBS[k % len(OBS)], ADMISSIBLE, history, k, compact=True),
                                  chat_template=True, max_tokens=4096)
    response_ids = ids_of(tok, respond(action)) + [tok.eos_token_id]
    text = decode(tok, response_ids)
    chars = action_span(text)
    target = token_span(tok, response_ids, *chars) if chars else None
    parsed, valid = parse_action(text)
    assert valid == (action is not None) and parsed == action
    if policy is None:
        logprobs = [-0.5 - 0.01 * j for j in range(len(response_ids))]
    else:
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logprobs = sequence_logprobs(policy, ids, torch.ones_like(ids))[0, len(prompt_ids):].tolist()
    state = EnvState(goal=GOAL, observation=OBS[(k + 1) % len(OBS)], admissible=tuple(ADMISSIBLE), won=won,
                     done=won, steps=k + 1)
    tr = Transition(text, parsed, valid, step_reward(won, valid), state)
    return StepRecord(tuple(prompt_ids), tuple(response_ids), tuple(logprobs), text, target, tr)


def make_traj(tok, group: int, member: int, plan, *, win: bool = False, failed: bool = False, policy=None):
    """plan: actions (None = an invalid step); `win` marks the last step as the winning one."""
    steps = tuple(make_step(tok, k, a, won=win and k == len(plan) - 1, policy=policy) for k, a in enumerate(plan))
    return Trajectory(TASK, group, member, steps, failed)


WIN_PLAN = ["go to countertop 1", "take mug 1 from countertop 1", None, "clean mug 1 with sinkbasin 1"]


def two_groups(tok, policy=None) -> list[Trajectory]:
    """Group 0: a win with one invalid step (R = 10 - 0.1 = 9.9) and a loss (R = 0).
    Group 1: a loss with an invalid step (R = -0.1), a loss (R = 0) and an engine failure (left out)."""
    return [
        make_traj(tok, 0, 0, WIN_PLAN, win=True, policy=policy),
        make_traj(tok, 0, 1, ["go to fridge 1", "look"], policy=policy),
        make_traj(tok, 1, 0, ["go to drawer 2", None], policy=policy),
        make_traj(tok, 1, 1, ["inventory", "look"], policy=policy),
        make_traj(tok, 1, 2, ["look"], failed=True, policy=policy),
    ]


# ================================================================================ 1. token_span
def _check_cover(tok, ids, start, end):
    """[ts, te) covers chars [start, end) of decode(ids) and is minimal; returns whether it straddles."""
    text = decode(tok, ids)
    ts, te = token_span(tok, ids, start, end)
    assert 0 <= ts < te <= len(ids)
    pre = lambda k: len(decode(tok, ids[:k]))  # noqa: E731
    lo, hi = pre(ts), pre(te)
    assert lo <= start and hi >= end  # every char of the block is inside the span
    assert decode(tok, ids[ts:te]) == text[lo:hi]
    assert text[start:end] in decode(tok, ids[ts:te])
    assert pre(ts + 1) > start  # dropping the first token would lose the block's first char
    assert pre(te - 1) < end  # dropping the last token would lose its last char
    return lo < start, hi > end


def test_token_span_word_tokenizer_is_exact(tok):
    for action in ADMISSIBLE:
        ids = ids_of(tok, respond(action)) + [tok.eos_token_id]  # a trailing eos decodes to nothing
        text = decode(tok, ids)
        start, end = action_span(text)
        ts, te = token_span(tok, ids, start, end)
        assert decode(tok, ids[ts:te]) == text[start:end] == f"<action>{action}</action>"
        assert _check_cover(tok, ids, start, end) == (False, False)
        assert te == len(ids) - 1  # the eos is not part of the target


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE without pre-split regex, so merges run across tag boundaries
    (`.</think><action>` and `</action> ok.` become single tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([respond(a) + " ok." for a in ADMISSIBLE] * 4 + corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def test_token_span_byte_level_bpe_straddling_merges(bpe_tok):
    front = back = 0
    for action in ADMISSIBLE:
        for text in (respond(action), respond(action) + " ok.", "x " + respond(action) + "\n"):
            ids = ids_of(bpe_tok, text)
            assert decode(bpe_tok, ids) == text
            start, end = action_span(text)
            f, b = _check_cover(bpe_tok, ids, start, end)
            front, back = front + f, back + b
    # the test is only meaningful if merges really straddled both edges of the block somewhere
    assert front > 0 and back > 0


def test_token_span_bad_spans_raise(tok):
    ids = ids_of(tok, respond("look"))
    n = len(decode(tok, ids))
    for start, end in [(5, 5), (7, 3), (-1, 4), (n, n + 3), (n - 2, n + 1), (n + 5, n + 9)]:
        with pytest.raises(ValueError, match="span"):
            token_span(tok, ids, start, end)
    assert token_span(tok, ids, 0, n) == (0, len(ids))


# ================================================================================ 2. hindsight blocks
def test_hindsight_blocks_mixed_and_uniform_groups(tok):
    trajs = [
        make_traj(tok, 0, 0, ["go to fridge 1", "look"]),  # failed member of a mixed group
        make_traj(tok, 0, 1, WIN_PLAN, win=True),  # the first success
        make_traj(tok, 0, 2, ["inventory"]),  # failed member of a mixed group
        make_traj(tok, 0, 3, ["go to countertop 1", "clean mug 1 with sinkbasin 1"], win=True),  # a later success
        make_traj(tok, 1, 0, ["look"]),  # uniform group (all failed)
        make_traj(tok, 1, 1, [None]),
        make_traj(tok, 2, 0, ["look"], win=True),  # uniform group (all won)
        make_traj(tok, 2, 1, ["inventory"], win=True),
    ]
    blocks = hindsight_blocks(trajs, tok, peer_budget=512)
    # the numbered action list of the FIRST successful member; the invalid step 3 is dropped,
    # the others keep their step numbers
    peer = "1. go to countertop 1\n2. take mug 1 from countertop 1\n4. clean mug 1 with sinkbasin 1"
    assert alfworld_peer_lines(trajs[1]) == peer.split("\n")
    failed_block = ("\n<hindsight>\nfinal_correctness: incorrect\npeer_correct_trajectory:\n"
                    f"<peer_correct_trajectory>\n{peer}\n</peer_correct_trajectory>\n</hindsight>\n")
    assert blocks[0] == blocks[2] == failed_block
    correct = "\n<hindsight>\nfinal_correctness: correct\n</hindsight>\n"
    incorrect = "\n<hindsight>\nfinal_correctness: incorrect\n</hindsight>\n"
    assert blocks[1] == blocks[3] == correct  # successes: correctness only
    assert blocks[4:6] == [incorrect, incorrect]  # uniform failures: no peer to show
    assert blocks[6:8] == [correct, correct]
    assert all("peer" not in b for b in blocks[1:2] + blocks[3:])


def test_fit_from_front_drops_whole_lines(tok):
    lines = alfworld_peer_lines(make_traj(tok, 0, 0, WIN_PLAN, win=True))
    cost = [len(ids_of(tok, line + "\n")) for line in lines]
    last_two = cost[-2] + cost[-1]
    assert fit_from_front(lines, tok, last_two) == "\n".join(lines[-2:])
    assert len(ids_of(tok, fit_from_front(lines, tok, last_two) + "\n")) == last_two  # fits exactly
    assert fit_from_front(lines, tok, last_two - 1) == lines[-1]
    assert fit_from_front(lines, tok, sum(cost)) == "\n".join(lines)
    assert fit_from_front(lines, tok, cost[-1] - 1) == ""
    # the budget reaches the peer block through hindsight_blocks
    trajs = [make_traj(tok, 0, 0, ["look"]), make_traj(tok, 0, 1, WIN_PLAN, win=True)]
    block = hindsight_blocks(trajs, tok, peer_budget=last_two)[0]
    assert f"<peer_correct_trajectory>\n{lines[-2]}\n{lines[-1]}\n</peer_correct_trajectory>" in block
    assert lines[0] not in block


# ================================================================================ 3. teacher inputs
def test_teacher_inputs_insert_hindsight_before_target(tok):
    pad = tok.pad_token_id
    steps = [make_step(tok, 0, "go to countertop 1"), make_step(tok, 1, "take mug 1 from countertop 1"),
             make_step(tok, 2, None)]  # the last row has no target
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in steps) + 2
    input_ids = torch.full((3, width), pad)
    step_ids = torch.full((3, width), -1)
    spans = []
    for r, s in enumerate(steps):
        row = list(s.prompt_ids + s.response_ids)
        input_ids[r, :len(row)] = torch.tensor(row)
        if s.target is not None:
            ts, te = len(s.prompt_ids) + s.target[0], len(s.prompt_ids) + s.target[1]
            step_ids[r, ts:te] = r + 3  # any step index
            spans.append((r, ts, te))
    row_traj = torch.tensor([1, 0, 0])
    blocks = [hindsight_text(True), hindsight_text(False, "1. go to countertop 1\n2. look")]
    before = input_ids.clone()
    ti = teacher_inputs(step_ids, input_ids, row_traj, blocks, tok, pad_id=pad)

    assert ti.rows.tolist() == [0, 1]  # row 2 has no target: skipped
    for i, (r, ts, te) in enumerate(spans):
        h = ids_of(tok, blocks[int(row_traj[r])])
        expected = input_ids[r, :ts].tolist() + h + input_ids[r, ts:te].tolist()
        n = len(expected)
        assert ti.input_ids[i, :n].tolist() == expected
        assert ti.attention_mask[i, :n].eq(1).all() and ti.attention_mask[i, n:].eq(0).all()
        assert ti.input_ids[i, n:].eq(pad).all()
        z = te - ts
        assert ti.target_pos[i, :z].tolist() == list(range(ts + len(h), te + len(h)))
        assert ti.batch_pos[i, :z].tolist() == list(range(ts, te))
        assert ti.target_pos[i, z:].eq(-1).all() and ti.batch_pos[i, z:].eq(-1).all()
        # the same token ids on both sides
        assert torch.equal(ti.input_ids[i, ti.target_pos[i, :z]], input_ids[r, ti.batch_pos[i, :z]])
        assert decode(tok, ti.input_ids[i, ti.target_pos[i, :z]].tolist()).startswith("<action>")
    # the student side (the batch rows) never sees the hindsight block
    assert torch.equal(input_ids, before)
    for tag in ("<hindsight>", "</hindsight>", "<peer_correct_trajectory>"):
        tag_id = tok.convert_tokens_to_ids(tag)
        assert not (input_ids == tag_id).any() and (ti.input_ids == tag_id).any()
    # no target anywhere: nothing to rescore
    empty = teacher_inputs(torch.full((2, 4), -1), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 0]),
                           blocks[:1], tok, pad_id=pad)
    assert empty.input_ids.shape[0] == 0 and empty.rows.numel() == 0


# ================================================================================ 4. build_batch
def test_build_batch_rewards_advantages_and_layout(tok):
    trajs = two_groups(tok)
    batch, metrics = build_batch(trajs, pad_id=tok.pad_token_id)
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
    assert batch.traj_group.tolist() == [0, 0] and batch.trajectories == tuple(g0[:2])
    a0 = 4.95 / (4.95 * math.sqrt(2) + 1e-6)
    torch.testing.assert_close(batch.traj_adv, torch.tensor([a0, -a0]), atol=1e-5, rtol=0)
    assert metrics["rollout/failed_trajectories"] == 2 and metrics["rollout/dropped_groups"] == 1


def test_build_batch_all_failed_raises(tok):
    trajs = [dataclasses.replace(t, failed=True) for t in two_groups(tok)[:2]]
    with pytest.raises(RuntimeError, match="2 of 2 trajectories failed and no group kept two members"):
        build_batch(trajs, pad_id=tok.pad_token_id)


# ================================================================================ 5. rescore
class Boom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher must not run when lambda = 0")


@pytest.fixture(scope="module")
def onpolicy_trajs(tok, model):
    return two_groups(tok, policy=model)


def fresh_batch(tok, trajs) -> RolloutBatch:
    return build_batch(trajs, pad_id=tok.pad_token_id)[0]


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


# ================================================================================ 6. teacher log-probs
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


# ================================================================================ 7. teacher snapshot
def _params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


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


# ================================================================================ 8. GRPOModule
PPO = dict(kl_coef=0.0, entropy_coef=0.0, lr=1e-3, max_grad_norm=1.0)


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


def _fit(policy, batch, ppo: PPOConfig, callbacks=()):
    module = GRPOModule(policy, ppo)
    loader = DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_steps=1, limit_train_batches=1, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


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

    # through the TeacherRescoring callback with lambda = 0 the update is exactly GRPO's
    policy_cb = copy.deepcopy(model)
    _fit(policy_cb, fresh_batch(tok, onpolicy_trajs), ppo,
         callbacks=[TeacherRescoring(StepOPSDConfig(lam0=0.0), tok)])
    assert _params_equal(policy_cb, policy)


def test_training_step_rejects_off_policy_logprobs(tok, model, onpolicy_trajs):
    batch = fresh_batch(tok, onpolicy_trajs)
    shifted = dataclasses.replace(batch, rollout_logp=batch.rollout_logp + batch.loss_mask)  # +1.0 per response token
    policy = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="log-probs differ"):
        _fit(policy, shifted, PPOConfig(**PPO))
    assert _params_equal(policy, model)  # nothing was updated


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
    trainer = _fit(short, fresh_batch(tok, onpolicy_trajs), ppo, callbacks=[TeacherRescoring(StepOPSDConfig(lam0=0.2), tok)])
    assert float(trainer.callback_metrics["stepopsd/rescoring_failed"]) == 1.0
    assert _params_equal(short, plain)
    ok = copy.deepcopy(model)  # with the real limit the teacher rescored: another update
    trainer = _fit(ok, fresh_batch(tok, onpolicy_trajs), ppo, callbacks=[TeacherRescoring(StepOPSDConfig(lam0=0.2), tok)])
    assert float(trainer.callback_metrics["stepopsd/rescoring_failed"]) == 0.0 and not _params_equal(ok, plain)


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


# ================================================================================ rollout loop
class ScriptedEnv:
    """Two tasks x G=2 slots; every slot answers with the next scripted action; slot 3's engine fails."""

    def __init__(self, plans):
        self.plans = plans
        self.k = [0] * len(plans)
        self.done = [False] * len(plans)

    def reset(self, tasks, group_size):
        assert len(tasks) * group_size == len(self.plans)
        return [EnvState(GOAL, OBS[0], tuple(ADMISSIBLE)) for _ in self.plans]

    def live_slots(self):
        return [s for s, d in enumerate(self.done) if not d]

    def prompt(self, slot):
        return render_prompt(GOAL, OBS[self.k[slot]], ADMISSIBLE, [], self.k[slot], compact=True)

    def target_chars(self, response, mode):
        return action_span(response)

    def step(self, responses):
        out = {}
        for slot, text in responses.items():
            action, valid = parse_action(text)
            self.k[slot] += 1
            last = self.k[slot] == len(self.plans[slot])
            won, failed = last and slot == 0, last and slot == 3
            self.done[slot] = last
            out[slot] = Transition(text, action, valid, step_reward(won, valid),
                                   EnvState(GOAL, OBS[self.k[slot]], tuple(ADMISSIBLE), won=won, done=last,
                                            steps=self.k[slot], failed=failed))
        return out


class ScriptedBackend:
    def __init__(self, tok, env):
        self.tok, self.env, self.prompts = tok, env, []

    def generate(self, prompts, params, *, seed=None):
        self.prompts += [list(p) for p in prompts]
        out = []
        for slot in self.env.live_slots():
            ids = ids_of(self.tok, respond(self.env.plans[slot][self.env.k[slot]])) + [self.tok.eos_token_id]
            out.append(Generation(tuple(ids), tuple(-0.1 for _ in ids), "stop"))
        return out

    def sync_weights(self, model):
        pass


def test_rollout_records_steps_targets_and_groups(tok):
    plans = [["go to countertop 1", "take mug 1 from countertop 1"], ["look", None, "inventory"], [None], ["look"]]
    env = ScriptedEnv(plans)
    backend = ScriptedBackend(tok, env)
    tasks = [TASK, dataclasses.replace(TASK, task_id="train/clean-mug/trial_1")]
    cfg = RolloutConfig(group_size=2, sampling=SamplingParams(max_new_tokens=64))
    trajs, stats = rollout(env, backend, tok, tasks, cfg)
    assert [(t.group, t.member, t.task.task_id) for t in trajs] == [
        (0, 0, tasks[0].task_id), (0, 1, tasks[0].task_id), (1, 0, tasks[1].task_id), (1, 1, tasks[1].task_id)]
    assert [len(t.steps) for t in trajs] == [2, 3, 1, 1] and [t.failed for t in trajs] == [False, False, False, True]
    assert stats.turns == 3 and stats.steps == 7 and stats.failed_trajectories == 1
    assert trajs[0].success and trajs[0].outcome_reward == 10.0 and trajs[1].outcome_reward == pytest.approx(-0.1)
    for t, plan in zip(trajs, plans):
        for s, action in zip(t.steps, plan):
            assert (s.target is None) == (action is None)
            if s.target is not None:
                assert decode(tok, s.response_ids[s.target[0]:s.target[1]]) == f"<action>{action}</action>"
            assert s.response == decode(tok, s.response_ids) and len(s.rollout_logprobs) == len(s.response_ids)
            assert s.prompt_ids[-3:] == tuple(ids_of(tok, "<|im_start|>assistant\n"))  # chat-wrapped
    hindsight_ids = {tok.convert_tokens_to_ids(t) for t in ("<hindsight>", "<peer_correct_trajectory>")}
    assert not any(hindsight_ids & set(p) for p in backend.prompts)  # nothing of h_i reaches the rollout
    batch, metrics = build_batch(trajs, pad_id=tok.pad_token_id)
    # group 1 lost member 1: its one survivor (1 step) is dropped with it, and counted
    assert batch.num_rows == 5 and metrics["rollout/failed_trajectories"] == 1 and metrics["rollout/dropped_groups"] == 1
    assert batch.traj_group.tolist() == [0, 0]


def test_encode_prompt_left_truncates(tok):
    text = render_prompt(GOAL, OBS[1], ADMISSIBLE, [], 0, compact=True)
    full, cut = encode_prompt(tok, text, chat_template=False, max_tokens=10_000)
    assert not cut and full == ids_of(tok, text)
    short, cut = encode_prompt(tok, text, chat_template=False, max_tokens=16)
    assert cut and short == full[-16:]


# ================================================================================ 9. config validation
BAD_CONFIGS = [
    (PPOConfig, dict(lr=0.0)), (PPOConfig, dict(epochs=0)), (PPOConfig, dict(mini_batch_rows=0)),
    (PPOConfig, dict(clip_low=1.0)), (PPOConfig, dict(clip_high=0.0)), (PPOConfig, dict(agg="sum")),
    (PPOConfig, dict(kl_coef=-0.1)), (PPOConfig, dict(entropy_coef=-1.0)), (PPOConfig, dict(max_grad_norm=0.0)),
    (PPOConfig, dict(temperature=0.0)),
    (RolloutConfig, dict(group_size=0)), (RolloutConfig, dict(max_prompt_tokens=8)),
    (RolloutConfig, dict(target_mode="actions")),
    (StepOPSDConfig, dict(alpha_clip=0.0)), (StepOPSDConfig, dict(alpha_clip=1.5)), (StepOPSDConfig, dict(lam0=-0.1)),
    (StepOPSDConfig, dict(lam0=1.5)), (StepOPSDConfig, dict(weight_fn="tanh")), (StepOPSDConfig, dict(budget_clip=0.5)),
    (StepOPSDConfig, dict(decay_steps=0)), (StepOPSDConfig, dict(teacher_refresh=-1)),
    (StepOPSDConfig, dict(target_span="whole")), (StepOPSDConfig, dict(peer_budget_tokens=0)),
    (SamplingParams, dict(max_new_tokens=0)), (SamplingParams, dict(top_p=0.0)),
]


@pytest.mark.parametrize("cls,kwargs", BAD_CONFIGS, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_bad_config_values_raise_one_line(cls, kwargs):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert message and "\n" not in message
    assert any(name.rstrip("0") in message for name in kwargs)  # names the knob (lam0 -> "lam")
    cls()  # the defaults are valid


def test_task_order_is_a_seeded_permutation_per_pass_split_across_ranks():
    from types import SimpleNamespace

    from stepopsd.data.datamodule import RolloutDataModule

    def picks(rank, world, steps):
        dm = RolloutDataModule(list(range(6)), None, None, None, None, tasks_per_step=1, seed=3)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        return [t for _ in range(steps) for t in dm._rank_tasks(1)]

    single = picks(0, 1, 12)
    assert sorted(single[:6]) == sorted(single[6:]) == list(range(6)) and single[:6] != single[6:]
    r0, r1 = picks(0, 2, 3), picks(1, 2, 3)
    assert sorted(r0 + r1) == list(range(6))  # two ranks share one pass without overlap
    assert [single[i] for i in (0, 2, 4)] == r0 and [single[i] for i in (1, 3, 5)] == r1
