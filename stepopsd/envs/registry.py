"""The environment registry: `env=<name>` (the config's `env.name`) picks a registered `EnvSpec`.

An `EnvSpec` holds everything a run needs to know about one environment, so that nothing outside `envs/`
branches on the environment's name: its config checks, its data (generated when asked, then loaded split by
split), the services it needs for the run (Search-QA's retriever), the factory of the environment itself, how a
peer trajectory is written into a hindsight block, and the expert demonstrations the tiny policy is warm-started
on. Each environment registers its spec in `stepopsd/envs/<name>/spec.py`, found by itself (`package_modules`):

    @register_env("search")
    class SearchSpec(EnvSpec): ...

`get_env` of an unknown name raises `UnknownEnvError`, one line listing the registered names. Specs receive the
run config (an OmegaConf node) and return plain values; this package knows nothing of learning. Checks raise
ValueError with one line that the caller turns into its own error type.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from stepopsd.errors import UserError
from stepopsd.registry import Registry, package_modules
from stepopsd.types import Task, Trajectory


class UnknownEnvError(UserError, ValueError):
    """`env.name` names no registered environment: one line listing the registered ones."""


@dataclass
class EnvConfig:
    """The `env` config node every environment has (its schema: `EnvSpec.config`); environments with more knobs
    subclass it and set their protocol's defaults. `name` is the registered name (set when the schema is registered)."""

    name: str = ""
    max_steps: int = 50  # env steps per episode
    history_length: int = 2  # earlier (observation, action) pairs in each prompt
    compact: bool = False  # the compact prompt template (the tiny word-level policy)
    require_think: bool = False  # a step without <think>...</think> before the action is invalid (conf/env: the model's)
    success_metric: str = "success"  # what validation reports per task type (or data source)
    target_span: str = "action_only"  # the tokens of a step trained on (spec §5), for every algorithm
    peer_budget_tokens: int = 512  # token budget of the peer trajectory in a hindsight block (spec §6)
    anchor_similarity: float = 1.0  # when two steps' observations are one state (GiGPO's anchors): 1.0 identical text


class EnvSpec:
    """One environment, as a run uses it (no-op defaults for the optional parts). `name` is set by `register_env`."""

    name: str = ""
    config: type = EnvConfig  # the schema of its `env` config node: knobs, types, defaults
    hindsight_demonstrations: bool = False  # its `demonstrations` add teacher-format records (`sft.hindsight_examples`)

    def exact_credit(self, cfg):
        """None, or `credit(trajectory, step, first_actions) -> (exact advantage, pivotal)`: the exact credit of a
        step of this environment's trajectory under the policy whose actions at that state were `first_actions`
        (sampled, None for an invalid one), for the credit probe (`stepopsd.probe`)."""
        return None

    def check(self, cfg) -> None:
        """The environment's own knobs (`cfg.env`), before any work: ValueError, one line."""

    def check_splits(self, splits: list[str], key: str) -> None:
        """Split names of config key `key` (already non-empty and distinct): ValueError, one line."""

    def check_task_types(self, types, key: str) -> None:
        """Task types (or data sources) of config key `key`: ValueError, one line."""

    def prepare_data(self, cfg) -> str:
        """The data folder (`data.path`), generated into first when `data.generate` asks for it and it is missing."""
        return cfg.data.path

    def load_split(self, cfg, data: str, split: str, types, limit: int | None = None) -> list[Task]:
        """The tasks of one split of `data` restricted to `types` (at most `limit`)."""
        raise NotImplementedError

    def corpus(self, cfg, data: str) -> str | None:
        """A text corpus the environment reads besides its tasks (Search-QA's retrieval corpus), or None."""
        return None

    def check_services(self, cfg, data: str) -> None:
        """The inputs of the run's services, checked before the policy is built (one-line errors)."""

    @contextlib.contextmanager
    def services(self, cfg, data: str) -> Iterator[Any]:
        """The services the environment needs while the run lasts; yields what `env_factory` takes (None here)."""
        yield None

    def env_factory(self, cfg, service: Any = None) -> Callable[[], Any]:
        """A no-argument callable building the configured environment (in each process that needs one)."""
        raise NotImplementedError

    def peer_lines(self, peer: Trajectory) -> list[str]:
        """A successful peer trajectory as the lines of a hindsight block (spec §6)."""
        raise NotImplementedError

    def check_demonstrations(self, sft) -> None:
        """The tiny policy's SFT config (`stepopsd.sft.TinySFTConfig`) for this environment: ValueError, one line."""

    def demonstrations(self, sft, path: str, workers: int | None, log) -> tuple[list[dict], list[str], str, str]:
        """Expert demonstrations from the training tasks of `sft.data`, for the tiny policy's SFT, written to `path`
        (JSONL): (records of {"prompt", "response"}, extra tokenizer texts, an example peer block, data label). With
        `hindsight_demonstrations`, records may also be in the teacher's format: {"prompt", "response", "target":
        [start, end) of the action in the response, "hindsight": {"success", "peer": lines or None}} (`stepopsd.sft`)."""
        raise NotImplementedError


_ENVS: Registry[EnvSpec] = Registry("environment", "env.name", UnknownEnvError, "stepopsd/envs/<name>/spec.py",
                                    discover=package_modules("stepopsd.envs", "spec"), origin=type)


def register_env(name: str):
    """Class decorator: register an `EnvSpec` subclass (one instance of it) under `name`, the `env.name` that picks it."""
    def instance(cls: type[EnvSpec], old) -> EnvSpec:
        cls.name = name
        return cls()
    return _ENVS.register(name, instance)


def env_names() -> list[str]:
    return _ENVS.names()


def get_env(name: str) -> EnvSpec:
    """The registered environment `name`; `UnknownEnvError` (one line) for any other."""
    return _ENVS.get(name)
