"""Advantage estimators: one interface, one registry, picked by `algorithm=<name>`.

An estimator turns a rollout batch into per-token advantages. It receives the whole `RolloutBatch`: the outcome
rewards and group ids per trajectory (`traj_reward`, `traj_group`), the row layout (`row_traj`, `row_step`,
`loss_mask`, `step_ids` on the target spans) and the trajectory records themselves (`batch.trajectories`: every
step's prompt, response, the observation it acted on (`StepRecord.observation`, a hashable state key for
step-level grouping) and the env transition). It returns an `Advantages` record: [N, L] token advantages (0 off
the loss mask), optionally the per-trajectory values [M], its metrics and a loss term of its own (`distill`: SDAR's
self-distillation term, which the PPO update adds).

    @register_estimator("rloo")
    class RLOO(Estimator):
        def advantages(self, batch, ctx): ...

A module in this package that registers an estimator is found by itself (`package_modules`): adding one is a module,
a conf/algorithm/<name>.yaml (one line: its schema, `stepopsd.schemas`, plus what differs from the defaults) and a
test. The estimator's knobs are the dataclass in its `config` attribute (`AlgorithmConfig` or a subclass adding
fields): Hydra composes the `algorithm` node on it, so each knob's type and default are written there once and a
misspelt knob is Hydra's own error. The training step calls the
configured estimator at one stage (`stepopsd.callbacks.advantages.AdvantageStage`), before the PPO update.
Estimators may keep state (StepOPSD: the stale teacher and its clock): `setup` is called once with the policy and
the run's `Services`, `state_dict` / `load_state_dict` go into checkpoints. One estimator may compose over another
(StepOPSD reshapes the advantages of `algorithm.base`).

`estimator_names()` lists what is registered; each module's docstring says what its estimator computes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch

from stepopsd.algorithms.distill import DistillTerm
from stepopsd.algorithms.grpo import PPOConfig
from stepopsd.data.batch import RolloutBatch
from stepopsd.errors import UserError
from stepopsd.registry import Registry, package_modules


@dataclass(frozen=True)
class Advantages:
    """What an estimator returns."""

    tokens: torch.Tensor  # [N, L] advantage of every token (0 off the loss mask)
    trajectories: torch.Tensor | None = None  # [M] one value per trajectory, for outcome-level estimators
    metrics: dict = field(default_factory=dict)  # logged on the training step (reduced across ranks)
    # a loss term the estimator adds to the PPO update (SDAR's self-distillation baselines): the teacher's log-probs
    # of the target tokens [N, L] and the term's coefficients (`stepopsd.algorithms.distill.DistillTerm`)
    teacher_logp: torch.Tensor | None = None
    distill: DistillTerm | None = None


@dataclass(frozen=True)
class Services:
    """What the run gives an estimator at `setup` (teacher-shaped estimators, and GiGPO's anchor similarity)."""

    tokenizer: Any = None
    temperature: float = 1.0  # the rollout's sampling temperature (log-probs are taken at it)
    peer_lines: Callable | None = None  # the environment's peer serialisation for hindsight blocks (spec §6)
    frozen_dtype: torch.dtype | None = None  # dtype of frozen copies (a teacher snapshot)
    anchor_similarity: float = 1.0  # the environment's `env.anchor_similarity` (GiGPO's anchor-state groups)
    exact_credit: Callable | None = None  # the environment's exact per-step credit, when it has one (the oracle)


@dataclass(frozen=True)
class Context:
    """The training step an estimator runs in."""

    step: int  # training steps done before this one (t of Eq. 9)
    policy: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")
    compute: Callable[[], ContextManager] = contextlib.nullcontext  # the trainer's precision (bf16-mixed: autocast)
    full_weights: Callable[[], ContextManager] = contextlib.nullcontext  # FSDP: the policy's gathered weights


@dataclass
class TeacherKnobs:
    """The teacher of the teacher-shaped estimators (stepopsd, rlsd, sdar, opsd, grpo_opsd; docs/estimators.md)."""

    micro_batch_rows: int = 8  # teacher-context rows per teacher forward pass (no grad), for teacher-shaped estimators
    # what the teacher reads besides the student's context (stepopsd.hindsight): hindsight, StepOPSD's block before the
    # step's target (the outcome, a successful peer; StepOPSD's method is defined with it), or skills, SDAR's: the
    # skill document of the trajectory's task type before the whole prompt, from `skills_dir`
    context: str = "hindsight"
    skills_dir: str | None = None  # context=skills: a folder in SDAR's layout (skill_mapping.json and the documents
    # it names), e.g. SDAR's skills/alfworld or skills/search, or one of your own
    skill_all: bool = False  # context=skills: every document for every task type (SDAR's skill_all)


@dataclass
class AlgorithmConfig:
    """The `algorithm` config node every estimator has (its schema, `Estimator.config`); estimators with more knobs
    subclass it. `name` is the registered name (set when the schema is registered)."""

    name: str = ""
    # the PPO update (Eq. 13-14): a run's micro-batches hold 8 rows (the paper's; PPOConfig's own 0, the whole
    # mini-batch, is the library's); ppo.temperature follows rollout.temperature
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(micro_batch_rows=8))
    teacher: TeacherKnobs = field(default_factory=TeacherKnobs)


class Estimator:
    """The interface (with no-op defaults for the optional parts). `name` is set by `register_estimator`."""

    name: str = ""
    config: type = AlgorithmConfig  # the schema of its `algorithm` node: knobs, types, defaults
    step_level: bool = False  # its advantages differ from step to step of a trajectory (GiGPO), not one per trajectory

    @classmethod
    def from_config(cls, algorithm: Mapping) -> "Estimator":
        """An estimator from the `algorithm` config node (a plain dict); ValueError for a bad knob."""
        return cls()

    def setup(self, policy: torch.nn.Module, services: Services) -> None:
        """Once, before training (the policy is built and sharded)."""

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UnknownEstimatorError(UserError, ValueError):
    """`algorithm=<name>` names no registered estimator: one line listing the registered ones."""


_ESTIMATORS: Registry[type[Estimator]] = Registry("advantage estimator", "algorithm", UnknownEstimatorError,
                                                  "stepopsd/estimators/", discover=package_modules(__name__))


def register_estimator(name: str):
    """Class decorator: register an `Estimator` subclass under `name` (the `algorithm.name` that picks it)."""
    def named(cls: type[Estimator], old) -> type[Estimator]:
        cls.name = name
        return cls
    return _ESTIMATORS.register(name, named)


def estimator_names() -> list[str]:
    return _ESTIMATORS.names()


def get_estimator(name: str) -> type[Estimator]:
    """The registered estimator class `name`; `UnknownEstimatorError` (one line) for any other."""
    return _ESTIMATORS.get(name)


def build_estimator(algorithm: Mapping) -> Estimator:
    """The estimator `algorithm["name"]` picks, built from the `algorithm` node (a dict); `UnknownEstimatorError`
    (one line) for an unregistered name, ValueError for a bad knob."""
    return get_estimator(algorithm.get("name")).from_config(algorithm)


def per_token(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """Per-trajectory values [M] broadcast to every loss-mask token of the trajectory's rows: [N, L]."""
    return values[batch.row_traj, None] * batch.loss_mask
