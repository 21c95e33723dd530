"""ALFWorld for RL rollouts: the data loader and a batched environment over worker processes.

`load_tasks` reads the official layout `<root>/json_2.1.1/<split>/<task-folder>/<trial>/` from
`$ALFWORLD_DATA` or a given path, official data and this project's generated games alike (the
loader tells them apart by the `stepopsd_generated` key in `traj_data.json`).

`AlfWorldEnv` runs G copies of each task (a GRPO group) as slots of an `EnvWorkerPool`; a group's
members must start from the same state (asserted on reset). `step` takes the model's responses
for the live slots, applies the protocol (parse `<action>`, invalid steps advance the episode and
cost the penalty, reward 10 * won, max steps) and returns `Transition`s. A crashed or timed-out
engine ends only its trajectory (`EnvState.failed`); the rest of the batch continues.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Mapping, Sequence

from stepopsd.envs.alfworld.engine import AlfWorldEngine
from stepopsd.errors import UserError
from stepopsd.envs.alfworld.prompts import parse_action, render_prompt, step_reward, target_chars
from stepopsd.envs.alfworld.tasks import GENERATED_KEY, SHORT_NAMES, SPLITS, TASK_TYPES, resolve_task_types, task_type_of
from stepopsd.envs.workers import EnvWorkerPool
from stepopsd.envs.slots import SlotEnv
from stepopsd.types import EnvState, Task, Transition

log = logging.getLogger(__name__)
INVALID_OBSERVATION = "Nothing happens."  # what the engine answers to a command it cannot run
INVALID_HISTORY_ACTION = "(no valid action)"  # how an invalid step shows in later prompts' history


class DataNotFoundError(UserError, FileNotFoundError):
    """No ALFWorld games where the config points."""


class BadGameError(UserError, ValueError):
    """A game folder whose files are truncated, corrupt or not ALFWorld's."""


def data_root(path: str | None = None) -> str:
    """The folder holding `json_2.1.1/`: the given path, else `$ALFWORLD_DATA`."""
    path = path or os.environ.get("ALFWORLD_DATA")
    if not path:
        raise DataNotFoundError(
            "no ALFWorld data path: set $ALFWORLD_DATA after `alfworld-download`, or generate offline games "
            "with `stepopsd-make-games --out DIR --seed 0` and pass DIR as the data path")
    path = os.path.expanduser(os.path.expandvars(path))
    return os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == "json_2.1.1" else path


def load_tasks(path: str | None = None, split: str = "train", task_types=None, limit: int | None = None) -> list[Task]:
    """Every solvable game of `split` (and of the given short task types), sorted by task id."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    types = set(resolve_task_types(task_types))
    root = data_root(path)
    folder = os.path.join(root, "json_2.1.1", split)
    tasks = []
    for dirpath, _, files in os.walk(folder):
        if "traj_data.json" not in files or "game.tw-pddl" not in files:
            continue
        if "movable" in dirpath or "Sliced" in dirpath:  # unsupported in ALFWorld's text version too
            continue
        task_folder = os.path.basename(os.path.dirname(dirpath))
        try:
            short = task_type_of(task_folder)
        except ValueError:
            continue
        if short not in types:
            continue
        traj = _read_json(os.path.join(dirpath, "traj_data.json"))
        if SHORT_NAMES.get(traj.get("task_type")) != short:
            raise BadGameError(f"{os.path.join(dirpath, 'traj_data.json')}: task_type {traj.get('task_type')!r} does not "
                               f"match its folder ({TASK_TYPES[short]}): not an ALFWorld game; re-download the data or "
                               "regenerate the games into an empty folder")
        gamefile = os.path.join(dirpath, "game.tw-pddl")
        if not _read_json(gamefile).get("solvable", False):  # written by ALFWorld's own check
            continue
        rel = os.path.relpath(dirpath, os.path.join(root, "json_2.1.1"))
        tasks.append(Task(rel, short, gamefile, split, GENERATED_KEY in traj))
    tasks.sort(key=lambda t: t.task_id)
    if not tasks:
        raise DataNotFoundError(
            f"no ALFWorld games for split {split!r} and types {sorted(types)} under {folder}: run `alfworld-download` "
            f"and set $ALFWORLD_DATA, or generate offline games with `stepopsd-make-games --out DIR --seed 0`")
    return tasks[:limit] if limit else tasks


def _read_json(path: str) -> dict:
    """A game folder's JSON file (traj_data.json, game.tw-pddl); a one-line `BadGameError` naming it when it
    is truncated or not JSON."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadGameError(f"{path} is not valid JSON ({e}): the file is truncated or corrupt; re-download the data "
                           "(alfworld-download) or regenerate the games") from None
    if not isinstance(data, dict):
        raise BadGameError(f"{path} holds a JSON {type(data).__name__}, not an object: not an ALFWorld game file")
    return data


class AlfWorldEnv(SlotEnv):
    """Batched ALFWorld: slot `g * group_size + j` is member j of group g (task g).

    `num_workers=0` runs the engines in this process (no crash isolation; for debugging)."""

    def __init__(self, num_workers: int = 2, *, max_steps: int = 50, step_timeout: float = 60.0,
                 require_think: bool = False, history_length: int = 2, compact: bool = False):
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1 (the paper protocol uses 50)")
        if history_length < 0:
            raise ValueError(f"history_length={history_length} must be >= 0 (the paper protocol uses 2)")
        self.max_steps = max_steps
        self.require_think = require_think
        self.history_length = history_length
        self.compact = compact
        self.pool = EnvWorkerPool(functools.partial(AlfWorldEngine, None), num_workers, step_timeout=step_timeout,
                                  reset_timeout=max(step_timeout, 120.0))
        self.tasks: list[Task] = []
        self.group_size = 0
        self.states: list[EnvState] = []
        self.histories: list[list[tuple[str, str]]] = []  # per slot: (observation, action text) of past steps

    def reset(self, tasks: Sequence[Task], group_size: int) -> list[EnvState]:
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1")
        self.tasks, self.group_size = list(tasks), group_size
        results = self.pool.reset([t.source for t in tasks for _ in range(group_size)])
        self.states = [self._state_of(r, steps=0) for r in results]
        self.histories = [[] for _ in self.states]
        for g, task in enumerate(self.tasks):
            members = [s for s in self.states[g * group_size:(g + 1) * group_size] if not s.failed]
            first = members[0] if members else None
            for s in members[1:]:
                if (s.goal, s.observation, s.admissible) != (first.goal, first.observation, first.admissible):
                    raise RuntimeError(f"group {g} ({task.task_id}) members start from different states: "
                                       "a GRPO group must be G copies of one game from one initial state")
        self._log_failures(results, "reset")
        return list(self.states)

    def prompt(self, slot: int) -> str:
        """The protocol prompt for a slot's next step (task, steps taken, recent history, admissible)."""
        s = self.states[slot]
        return render_prompt(s.goal, s.observation, s.admissible, self.histories[slot], s.steps,
                             history_length=self.history_length, compact=self.compact)

    def target_chars(self, response: str, mode: str = "action_only") -> tuple[int, int] | None:
        """Character span of the step target Z_k in a response (spec §5); None: no target (Δ = 0)."""
        return target_chars(response, mode, require_think=self.require_think)

    def step(self, responses: Mapping[int, str]) -> dict[int, Transition]:
        """One agent step for the given live slots (slot -> model response text)."""
        self._check_live(responses)
        parsed = {slot: parse_action(text, require_think=self.require_think) for slot, text in responses.items()}
        results = self.pool.step({slot: action for slot, (action, valid) in parsed.items() if valid})
        self._log_failures(results.values(), "step")
        out = {}
        for slot, text in responses.items():
            action, valid = parsed[slot]
            before = self.states[slot]
            if valid:
                state = self._state_of(results[slot], steps=before.steps + 1, goal=before.goal)
            else:  # nothing reaches the engine; the episode still advances
                state = EnvState(before.goal, INVALID_OBSERVATION, before.admissible, steps=before.steps + 1)
            if state.steps >= self.max_steps and not state.done:
                state = EnvState(state.goal, state.observation, state.admissible, steps=state.steps, done=True)
            self.histories[slot].append((before.observation, action if valid else INVALID_HISTORY_ACTION))
            self.states[slot] = state
            out[slot] = Transition(text, action, valid, step_reward(state.won, valid), state)
        return out

    def _state_of(self, result, *, steps: int, goal: str = "") -> EnvState:
        if result.failed:
            return EnvState(goal, "", (), steps=steps, done=True, failed=True, error=result.error)
        p = result.payload
        return EnvState(p.get("goal", goal), p["observation"], p["admissible"], won=p["won"], done=p["won"], steps=steps)

    def _log_failures(self, results, phase: str) -> None:
        for r in results:
            if r.failed:
                task = self.tasks[r.slot // self.group_size]
                log.warning("[alfworld %s] %s failed for slot %d (%s): %s", task.data_label, phase, r.slot, task.task_id, r.error)

    @property
    def num_failures(self) -> int:
        return self.pool.num_failures

    def close(self) -> None:
        self.pool.close()
