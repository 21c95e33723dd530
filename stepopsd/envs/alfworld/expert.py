"""Play a game with the `alfworld` package's own expert, optionally with epsilon-random detours.

Used for the generator's solvability check (epsilon = 0) and for SFT demonstrations (epsilon > 0
injects random admissible actions; the expert then has to recover, which is the behaviour an
imperfect warm start should show). `repeat > 0` also injects the tiny policy's most common mistake:
the last command again when it is no longer admissible (a second `go to` where the agent already
is, a second `take`), which the engine answers with "Nothing happens."; the expert then carries on,
so the demonstrations show how to get out of that state. The hand-coded expert draws from Python's global `random`, so
each episode seeds it; it also iterates over sets of names, so `play_experts` runs episodes in
processes started with a fixed PYTHONHASHSEED: the same moves on every run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
from collections.abc import Iterator
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


def play_expert(gamefile: str, *, max_steps: int = 50, epsilon: float = 0.0, repeat: float = 0.0, seed: int = 0,
                expert: str = "handcoded", engine: AlfWorldEngine | None = None) -> ExpertEpisode:
    if not (0.0 <= epsilon < 1.0 and 0.0 <= repeat < 1.0):
        raise ValueError(f"epsilon={epsilon} and repeat={repeat} must be in [0, 1): they are probabilities per step")
    engine = engine or AlfWorldEngine(expert=expert)
    random.seed(seed)  # the hand-coded expert's tie-breaks
    rng = random.Random(seed + 1)
    steps, goal, won = [], "", False
    try:
        state = engine.reset(gamefile)
        goal = state["goal"]
        for _ in range(max_steps):
            plan = state["expert_plan"]
            last = steps[-1].action if steps else None
            explore = epsilon > 0 and rng.random() < epsilon
            if repeat > 0 and last is not None and last not in state["admissible"] and rng.random() < repeat:
                action, is_expert = last, False  # an inadmissible repeat: "Nothing happens."
            elif explore or not plan:
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


def _play_job(job: tuple[str, dict]) -> ExpertEpisode:
    gamefile, kwargs = job
    return play_expert(gamefile, **kwargs)


def iter_experts(jobs: list[tuple[str, dict]], workers: int | None = None) -> Iterator[ExpertEpisode]:
    """`play_expert(gamefile, **kwargs)` for every (gamefile, kwargs) job, in parallel, yielded in job order
    as they finish (progress lines can follow them).

    Runs in freshly spawned processes with PYTHONHASHSEED=0 so the hand-coded expert, which
    iterates over sets of names, plays the same moves on every run and every machine."""
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:  # the workers start here, with that environment
        pool = mp.get_context("spawn").Pool(workers or os.cpu_count() or 1)
    finally:
        if saved is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = saved
    with pool:
        yield from pool.imap(_play_job, jobs, chunksize=1)


def play_experts(jobs: list[tuple[str, dict]], workers: int | None = None) -> list[ExpertEpisode]:
    """All of `iter_experts`, as a list."""
    return list(iter_experts(jobs, workers))
