"""Play a game with the `alfworld` package's own expert, optionally with epsilon-random detours.

Used for the generator's solvability check (epsilon = 0) and for SFT demonstrations (epsilon > 0
injects random admissible actions; the expert then has to recover, which is the behaviour an
imperfect warm start should show). The hand-coded expert draws from Python's global `random`, so
each episode seeds it; run it in a process started with a fixed PYTHONHASHSEED for byte-identical
results across runs (the generator's worker pool does).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from stepopsd.envs.alfworld.engine import AlfWorldEngine


@dataclass(frozen=True)
class ExpertStep:
    observation: str  # what the agent saw before acting
    admissible: tuple[str, ...]
    action: str
    is_expert: bool  # False: an injected random action


@dataclass(frozen=True)
class ExpertEpisode:
    gamefile: str
    goal: str
    steps: tuple[ExpertStep, ...]
    won: bool
    error: str = ""  # why the expert could not play (engine/expert exception), empty otherwise


def play_expert(gamefile: str, *, max_steps: int = 50, epsilon: float = 0.0, seed: int = 0,
                expert: str = "handcoded", engine: AlfWorldEngine | None = None) -> ExpertEpisode:
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon={epsilon} must be in [0, 1): it is the probability of a random action")
    engine = engine or AlfWorldEngine(expert=expert)
    random.seed(seed)  # the hand-coded expert's tie-breaks
    rng = random.Random(seed + 1)
    steps, goal, won = [], "", False
    try:
        state = engine.reset(gamefile)
        goal = state["goal"]
        for _ in range(max_steps):
            plan = state["expert_plan"]
            explore = epsilon > 0 and rng.random() < epsilon
            if explore or not plan:
                action, is_expert = rng.choice(state["admissible"]), False
            else:
                action, is_expert = plan[0], True
            steps.append(ExpertStep(state["observation"], state["admissible"], action, is_expert))
            state = engine.step(action)
            if state["won"]:
                won = True
                break
    except Exception as e:  # the expert raises on time-outs and on games it cannot parse
        return ExpertEpisode(gamefile, goal, tuple(steps), False, f"{type(e).__name__}: {e}")
    return ExpertEpisode(gamefile, goal, tuple(steps), won)
