"""Demonstrations of the credit games for the tiny policy's SFT, played through the real `CreditEnv` prompts.

An episode is the expert (`game.expert_action`: the right door at a gate, a random thing to look at elsewhere) that
errs: `epsilon` is the share of demonstration episodes that lose, whatever the number of gates k. Each gate opens
the right door with probability p = (1 - epsilon)^(1/k), else the door of a misread note (`game.misread_action`:
one consistent wrong door), so the episodes win with probability 1 - epsilon (0.3 of them at epsilon 0.7: the 20-40 % warm start the lab wants, for k = 1 and k = 3
alike). Every gate step, erring or not, is a training target (the warm start is meant to err as often), and as many
distractor steps, drawn at random from the episode's: they teach only the format and a uniform choice, and all of
them would triple the SFT's cost at H = 6, k = 1 for nothing. The response holds no reasoning (`<think></think>`):
the choice is the action's. Why a consistent mistake: with uniformly random wrong doors the demonstrations say
"right 30 %, each wrong door 23 %", almost nothing, and the tiny policy never learns to read the note at all
(measured: it stays at chance, 0.25, with 2,048 games); "right 30 %, the misread door 70 %" can only be learned by
reading the note, so the warm start reads it and errs as often as the demonstrations, and RL has one balance to move.

With `hindsight` > 0, that share of the steps also comes in the teacher's format (`stepopsd/hindsight.py`, Eq. 3):
the record's `hindsight` holds the block the teacher would be shown for this episode as a member of a group (its
outcome and, for a failed member, a successful peer in half of the cases, as in a mixed group), and its target is
what the block tells: the right door at a gate, the episode's own action elsewhere. `stepopsd.sft` renders the block
between the response's reasoning and its action and trains on the action only, so the teacher learns to read it.
"""
from __future__ import annotations

import random

from stepopsd.envs.alfworld.prompts import action_span, format_response
from stepopsd.envs.credit.env import CreditEnv
from stepopsd.envs.credit.game import Game, expert_action, misread_action
from stepopsd.types import Task


def peer_of(game: Game, rng: random.Random) -> list[str]:
    """A successful peer's hindsight lines (`peer_lines`' format): the expert's actions, numbered by step."""
    return [f"{t + 1}. {expert_action(turn, rng)}" for t, turn in enumerate(game.turns)]


def credit_demos(tasks: list[Task], *, episodes: int = 1, epsilon: float = 0.0, hindsight: float = 0.0, seed: int = 0,
                 compact: bool = True, history_length: int = 2) -> list[dict]:
    """{prompt, response} per step of `episodes` demonstration episodes of every task, plus the hindsight records."""
    env = CreditEnv(history_length=history_length, compact=compact)
    env.reset(tasks, episodes)
    rngs = [random.Random(f"credit-demo/{seed}/{t.task_id}/{j}") for t in tasks for j in range(episodes)]
    played: list[list[tuple]] = [[] for _ in rngs]
    while live := env.live_slots():
        responses = {}
        for slot in live:
            e, rng = env.episodes[slot], rngs[slot]
            turn, p = e.current, (1.0 - epsilon) ** (1.0 / len(e.game.gates))
            expert = turn.pivot < 0 or rng.random() < p
            action = expert_action(turn, rng) if expert else misread_action(turn)
            played[slot].append((env.prompt(slot), turn, action, expert))
            responses[slot] = format_response("", action)
        env.step(responses)
    records = []
    for slot, steps in enumerate(played):
        task, episode, rng = tasks[slot // episodes], env.episodes[slot], rngs[slot]
        base = {"task_id": task.task_id, "task_type": task.task_type, "data": task.data_label, "won": episode.won}
        others = [k for k, step in enumerate(steps) if step[1].pivot < 0]
        kept = sorted(episode.game.gates + tuple(rng.sample(others, min(len(others), len(episode.game.gates)))))
        for k in kept:
            prompt, turn, action, expert = steps[k]
            records.append(base | {"step": k, "prompt": prompt, "response": format_response("", action),
                                   "is_expert": expert})
            if hindsight and rng.random() < hindsight:
                peer = peer_of(episode.game, rng) if not episode.won and rng.random() < 0.5 else None
                response = format_response("", expert_action(turn) if turn.pivot >= 0 else action)
                records.append(base | {"step": k, "prompt": prompt, "response": response,
                                       "target": list(action_span(response)),
                                       "hindsight": {"success": episode.won, "peer": peer}})
    return records
