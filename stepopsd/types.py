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

    task_id: str  # stable id: "<split>/<task-folder>/<trial>" for ALFWorld, "<split>/<data_source>/<row>" for QA
    task_type: str  # ALFWorld short name (pick, look, clean, heat, cool, pick_two); QA: the data_source
    source: str  # path of the game file (ALFWorld) or data file (QA parquet)
    split: str  # train, valid_seen, valid_unseen (ALFWorld); train, test (QA)
    generated: bool
    question: str = ""  # Search-QA only: the question shown to the agent
    answers: tuple[str, ...] = ()  # Search-QA only: the gold answers (exact match against any)

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


@dataclass(frozen=True)
class StepRecord:
    """One agent step as generated: a training row in the step-per-row layout (ALFWorld)."""

    prompt_ids: tuple[int, ...]  # the full prompt the policy saw (chat template applied)
    response_ids: tuple[int, ...]  # sampled tokens, eos included when generated
    rollout_logprobs: tuple[float, ...]  # log pi_rollout of each response token (PPO's pi_old)
    response: str  # decoded response text
    target: tuple[int, int] | None  # [start, end) token span of the step target Z_k in the response; None: no target
    transition: Transition  # what the environment made of it
    observation: str = ""  # the env observation this step acted on (before it): a hashable state key that
    # step-level estimators group by (steps of one group in the same state)


@dataclass(frozen=True)
class Trajectory:
    """G of these with the same `group` form a GRPO group (same task, same initial state)."""

    task: Task
    group: int  # index of the group (task) in the rollout batch
    member: int  # 0..G-1 within the group
    steps: tuple[StepRecord, ...]
    failed: bool = False  # the engine crashed or timed out: left out of the update, counted in the logs

    @property
    def won(self) -> bool:
        return bool(self.steps) and self.steps[-1].transition.state.won

    @property
    def outcome_reward(self) -> float:
        """R_i: the sum of the step rewards (10 * won minus the invalid-action penalties)."""
        return sum(s.transition.reward for s in self.steps)

    @property
    def success(self) -> bool:
        return self.won
