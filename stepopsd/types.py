"""Data contracts between the stages of the framework. Read this module first.

Every stage takes one of these records and returns a new one; nothing grows keys as it flows.
Environment side (this file, so far):

    Task        one game (ALFWorld) or question (Search-QA) to roll out, G times per group
    EnvState    what an environment shows the agent after a reset or a step
    Transition  one agent step as the environment scored it
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """One task. `generated` is True for games/questions this project made (never official data)."""

    task_id: str  # stable id: "<split>/<task-folder>/<trial>" for ALFWorld
    task_type: str  # short name: pick, look, clean, heat, cool, pick_two
    source: str  # path of the game file (ALFWorld) or data file
    split: str  # train, valid_seen, valid_unseen
    generated: bool

    @property
    def data_label(self) -> str:
        """How every log line and table must name the data this task comes from."""
        return "generated" if self.generated else "official"


@dataclass(frozen=True)
class EnvState:
    """The environment after a reset or a step, as the agent will be shown it."""

    goal: str  # the task sentence shown to the agent
    observation: str  # the engine's feedback text of the last command (the room description on reset)
    admissible: tuple[str, ...]  # admissible commands, `help` removed
    won: bool = False
    done: bool = False  # won, step limit reached, or failed
    steps: int = 0  # agent steps taken so far (invalid ones included)
    failed: bool = False  # the engine crashed or timed out: the trajectory is marked failed
    error: str = ""  # why it failed (empty unless failed)


@dataclass(frozen=True)
class Transition:
    """One agent step: what the agent wrote, what was executed, what it earned."""

    response: str  # the model's full text
    action: str | None  # parsed command (lower case), None when the step is invalid
    valid: bool  # False: no well-formed action (penalised, episode still advances)
    reward: float  # env reward of this step: 10 * won on the winning step, minus the invalid penalty
    state: EnvState = field(repr=False, default=None)  # the environment after the step
