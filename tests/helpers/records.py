"""Hand-made rollout records on literal ALFWorld-protocol text, for the rollout-to-update tests (no ALFWorld engine).

A word-level tokenizer trained on that text (fixture `tok`), a one-layer tiny Qwen3 (fixture `model`), `StepRecord` /
`Trajectory` records as the rollout would make them (`make_step`, `make_traj`, `two_groups`), on-policy ones (fixture
`onpolicy_trajs`) and their training batch (`fresh_batch`). Import the fixtures into a test module to use them there.
"""
from __future__ import annotations

import pytest
import torch

from stepopsd.data.batch import RolloutBatch, build_batch

from helpers.batches import with_advantages
from stepopsd.envs.alfworld.prompts import action_span, format_response, parse_action, render_prompt, step_reward
from stepopsd.hindsight import hindsight_text
from stepopsd.policy.logprobs import sequence_logprobs
from stepopsd.policy.tiny import build_tiny_policy
from stepopsd.policy.tokenizer import train_word_tokenizer
from stepopsd.rollout import encode_prompt
from stepopsd.spans import decode, token_span
from stepopsd.types import EnvState, StepRecord, Task, Trajectory, Transition

from helpers.alfworld_text import ADMISSIBLE, GOAL, OBS
from helpers.tiny_policy import ids_of

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


@pytest.fixture(scope="module")
def onpolicy_trajs(tok, model):
    return two_groups(tok, policy=model)


def fresh_batch(tok, trajs) -> RolloutBatch:
    """The built batch with GRPO's advantages (Eq. 1), as the advantage stage gives them to the update."""
    return with_advantages(build_batch(trajs, pad_id=tok.pad_token_id)[0])
