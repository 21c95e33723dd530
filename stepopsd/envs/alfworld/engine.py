"""One ALFWorld game instance on the real engine (TextWorld + the `alfworld` package's wrappers).

`AlfWorldEngine` is what an env worker process hosts per slot: `reset(gamefile)` and `step(command)`
return small picklable dicts. The expert wrapper (hand-coded or planner) is attached only when asked
for (demonstrations, solvability checks): RL rollouts do not pay for it.
"""
from __future__ import annotations

import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

from stepopsd.envs.alfworld import engine_cache

engine_cache.install()  # same text, faster steps and resets (see engine_cache); STEPOPSD_PLAIN_TEXTWORLD=1 turns it off

BANNER = "-= Welcome to TextWorld, ALFRED! =-"
GOAL_MARK = "Your task is to: "


def split_intro(feedback: str) -> tuple[str, str]:
    """The engine's first feedback -> (observation without banner and task line, goal sentence)."""
    text = feedback.replace(BANNER, "").strip()
    obs, _, goal = text.partition(GOAL_MARK)
    return obs.strip(), goal.strip().rstrip(".").strip()


class _MoveAwareExpert(AlfredExpert):
    """The package's expert wrapper, with one compatibility fix for alfworld 0.4.2.

    The grammar shipped with 0.4.2 spells the put action `move X to Y`, but the hand-coded expert
    recognises a completed put only by the word "put" in the last command, so after a first
    `move` it keeps the object in its inventory and can never place a second one (every pick-two
    game fails). The expert is shown `put X to Y` for its bookkeeping; the engine runs `move`.
    """

    def _gather_infos(self):
        command = self.prev_command
        if command.startswith("move "):
            self.prev_command = "put " + command[len("move "):]
        try:
            super()._gather_infos()
        finally:
            self.prev_command = command


class AlfWorldEngine:
    """A single game. `expert` is None, "handcoded" or "planner"."""

    def __init__(self, expert: str | None = None):
        if expert not in (None, "handcoded", "planner"):
            raise ValueError(f"unknown ALFWorld expert {expert!r}: use handcoded, planner or None")
        self.expert = expert
        self._env = None
        self._gamefile = None

    def _start(self, gamefile: str) -> None:
        extras = ["gamefile"] + (["expert_plan"] if self.expert else [])
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
        wrappers = [AlfredDemangler(shuffle=False), AlfredInfos]
        if self.expert:
            wrappers.append(_MoveAwareExpert(expert_type=self.expert))
        self._env = textworld.start(gamefile, infos, wrappers=wrappers)
        self._gamefile = gamefile

    def reset(self, gamefile: str) -> dict:
        if self._env is None:
            self._start(gamefile)
        elif gamefile != self._gamefile:
            self._env.load(gamefile)
            self._gamefile = gamefile
        state = self._env.reset()
        obs, goal = split_intro(state.feedback)
        return self._payload(state, obs) | {"goal": goal}

    def step(self, command: str) -> dict:
        state, _, _ = self._env.step(command)
        return self._payload(state, state.feedback.strip())

    def _payload(self, state, observation: str) -> dict:
        out = {
            "observation": observation,
            "admissible": tuple(c for c in state["admissible_commands"] if c != "help"),
            "won": bool(state["won"]),
        }
        if self.expert:
            out["expert_plan"] = list(state["extra.expert_plan"])
        return out

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
