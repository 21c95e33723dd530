"""The credit-assignment environment for RL rollouts: tasks, the prompt, and a batched, pure-Python `SlotEnv`.

Protocol (ALFWorld's, `stepopsd.envs.alfworld.prompts`): each step is a fresh prompt holding the task, the steps
taken, the last `history_length` observations, the current observation and the admissible actions; the agent names
one inside `<action>...</action>` (after `<think>...</think>` when `require_think`). As in ALFWorld, a format-invalid
step costs the invalid-action penalty (0.1) and still advances, and a well-formed inadmissible command costs nothing
and does nothing (at a gate: a wrong door). One difference, on purpose: ALFWorld answers both with "Nothing happens."
in the next prompt and shows past actions in the history; here the next prompt is the next turn's scene whatever the
agent did, and the history shows past scenes only. No action of the agent reaches a later prompt, which is what makes
the exact credit of `credit.py` hold for any policy (and each step's observation, GiGPO's state key, is the turn's
scene for every member of a group).

`CreditEnv.snapshot()` / `restore()` copy every slot's state (frozen records): a probe branches continuations from
any step with them, or with `copy.deepcopy(env)`.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from stepopsd.envs.alfworld.prompts import parse_action, target_chars
from stepopsd.envs.credit.credit import INVALID_PENALTY, CreditState, advance, credit_records, start, step_reward
from stepopsd.envs.credit.game import SPLITS, TASK_TYPE, Game, read_games
from stepopsd.envs.slots import SlotEnv
from stepopsd.types import EnvState, Task, Transition


def load_tasks(folder: str, split: str, limit: int | None = None) -> list[Task]:
    """The games of `<folder>/<split>.jsonl` as tasks `<split>/<index>` (generated data, task type `credit`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown credit split {split!r}: use {', '.join(SPLITS)}")
    path = os.path.join(folder, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: leave data.path at its default (games are generated there) "
                                "or point it at a folder of credit games")
    games = read_games(path)
    n = min(len(games), limit) if limit else len(games)
    return [Task(f"{split}/{i:05d}", TASK_TYPE, path, split, games[i].generated) for i in range(n)]


def game_of_task(task: Task) -> Game:
    return read_games(task.source)[int(task.task_id.rsplit("/", 1)[1])]


def trajectory_credit(trajectory, weights=None, *, penalty: float = INVALID_PENALTY):
    """The exact-credit records (`credit.StepCredit`) of a finished `stepopsd.types.Trajectory` of this env, under the
    env's weights and penalty."""
    actions = [s.transition.action if s.transition.valid else None for s in trajectory.steps]
    return credit_records(game_of_task(trajectory.task), actions, weights, penalty=penalty)


def render_prompt(goal: str, observation: str, admissible: Sequence[str], seen: Sequence[str], steps_taken: int, *,
                  history_length: int = 2, compact: bool = False) -> str:
    """The prompt of the next step: `seen` holds every earlier observation (oldest first), of which the last
    `history_length` are shown under their step numbers. Deterministic in its inputs."""
    n = max(0, min(history_length, len(seen)))
    shown = [(len(seen) - n + i + 1, o) for i, o in enumerate(seen[len(seen) - n:])]
    if compact:  # the constant lines first: the note and the doors sit close to where the answer starts
        lines = [f"task: {goal}", "answer with <think>...</think><action>...</action>", f"step: {steps_taken}"]
        lines += [f"seen: {o}" for _, o in shown] + ["actions: " + " | ".join(admissible), f"obs: {observation}"]
        return "\n".join(lines)
    listed = "[" + ", ".join(f"'{a}'" for a in admissible) + "]"
    head = f"You are an agent walking through a house of rooms and gates. Your task is to: {goal}\n"
    if not steps_taken:
        body = f"This is your first step. What you currently observe: {observation}\n"
    else:
        body = f"You have already taken {steps_taken} step(s). "
        if shown:
            past = " ".join(f"[Observation {k}: '{o}']" for k, o in shown)
            body += f"Here are your {len(shown)} most recent observation(s): {past}\n"
        body += f"You are now at step {steps_taken + 1}, and you observe: {observation}\n"
    tail = ("First think step by step about the current situation and what to do next, and write that reasoning "
            "inside <think> </think> tags. Then choose exactly one of the admissible actions and write it inside "
            "<action> </action> tags.")
    return head + body + f"Your admissible actions now are: {listed}.\n\n" + tail


class CreditEnv(SlotEnv):
    """Batched credit games: slot `g * group_size + j` is member j of group g (task g); all in this process."""

    def __init__(self, *, weights=None, reward_noise: float = 0.0, invalid_penalty: float = INVALID_PENALTY,
                 history_length: int = 2, compact: bool = False, require_think: bool = False, seed: int = 0):
        if reward_noise < 0 or invalid_penalty < 0 or history_length < 0:
            raise ValueError(f"reward_noise={reward_noise}, invalid_penalty={invalid_penalty}, "
                             f"history_length={history_length}: each must be >= 0")
        self.weights = None if weights is None else tuple(weights)  # w_j per gate (None: 10 / k each)
        self.noise, self.penalty, self.history_length = reward_noise, invalid_penalty, history_length
        self.compact, self.require_think, self.seed = compact, require_think, seed
        self.tasks: list[Task] = []
        self.group_size = 0
        self.episodes: list[CreditState] = []
        self.states: list[EnvState] = []

    def reset(self, tasks: Sequence[Task], group_size: int) -> list[EnvState]:
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1")
        self.tasks, self.group_size = list(tasks), group_size
        self.episodes = [start(game_of_task(t), self.weights, f"{self.seed}/{t.task_id}/{j}")
                         for t in self.tasks for j in range(group_size)]
        self.states = [self._shown(e) for e in self.episodes]
        return list(self.states)

    @staticmethod
    def _shown(e: CreditState) -> EnvState:
        """What the agent is shown of an episode: the next turn's scene (the outcome once done)."""
        if e.done:
            return EnvState(e.game.goal, f"you reach the exit: {sum(e.hits)} of {len(e.hits)} gates opened right.", (),
                            won=e.won, done=True, steps=e.turn)
        return EnvState(e.game.goal, e.current.observation, e.current.admissible, steps=e.turn)

    def prompt(self, slot: int) -> str:
        e = self.episodes[slot]
        seen = [t.observation for t in e.game.turns[:e.turn]]  # past scenes only, never the agent's own actions
        return render_prompt(e.game.goal, e.current.observation, e.current.admissible, seen, e.turn,
                             history_length=self.history_length, compact=self.compact)

    def target_chars(self, response: str, mode: str = "action_only") -> tuple[int, int] | None:
        """Character span of the step target Z_k in a response (spec §5); None: no target."""
        return target_chars(response, mode, require_think=self.require_think, env="the credit env")

    def step(self, responses: Mapping[int, str]) -> dict[int, Transition]:
        """One step for the given live slots (slot -> model response text)."""
        self._check_live(responses)
        out = {}
        for slot, text in responses.items():
            action, valid = parse_action(text, require_think=self.require_think)
            after = advance(self.episodes[slot], action if valid else None)
            self.episodes[slot] = after
            self.states[slot] = self._shown(after)
            reward = step_reward(after, valid, penalty=self.penalty, sigma=self.noise)
            out[slot] = Transition(text, action, valid, reward, self.states[slot])
        return out

    def snapshot(self) -> tuple[list[CreditState], list[EnvState]]:
        """Every slot's state now (immutable records: the copy is the lists)."""
        return list(self.episodes), list(self.states)

    def restore(self, snapshot: tuple[list[CreditState], list[EnvState]]) -> None:
        """Back to a `snapshot()` of this env (same tasks and group size)."""
        episodes, states = snapshot
        if len(episodes) != len(self.episodes):
            raise ValueError(f"a snapshot of {len(episodes)} slots cannot restore an env of {len(self.episodes)}")
        self.episodes, self.states = list(episodes), list(states)
