"""The rollout loop (`stepopsd.rollout`) and the tasks it is given: steps, target spans and groups recorded from a
scripted environment and backend (nothing of the hindsight reaches the rollout), prompts left-truncated, and the
datamodule's task order, a seeded permutation per pass split across ranks.

A scripted environment and backend on a word tokenizer (`helpers.records`), no engine and no model.
"""
from __future__ import annotations

import dataclasses

import pytest

from stepopsd.data.batch import build_batch
from stepopsd.envs.alfworld.prompts import action_span, parse_action, render_prompt, step_reward
from stepopsd.policy.backends.base import Generation, SamplingParams
from stepopsd.rollout import RolloutConfig, encode_prompt, rollout
from stepopsd.spans import decode
from stepopsd.types import EnvState, Transition

from helpers.alfworld_text import ADMISSIBLE, GOAL, OBS
from helpers.records import TASK, ids_of, respond, tok  # noqa: F401  (tok: a fixture)


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
        # each step keeps the observation it acted on (the state key of step-level estimators): the reset's, then
        # the previous step's
        assert [s.observation for s in t.steps] == [OBS[0]] + [s.transition.state.observation for s in t.steps[:-1]]
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
