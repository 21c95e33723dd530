"""The generation-backend registry: `rollout.backend=<name>` picks a registered factory.

A backend module registers its factory, a callable `(model, tokenizer, **kwargs) -> GenerationBackend` (the
backend class itself, usually), under a name:

    @register_backend("hf", options=lambda cfg: {"batch_size": cfg.rollout.generate_batch_size})
    class HFBackend: ...

`options(cfg)` reads (and checks: ValueError, one line) that backend's keyword arguments from the run config; the
run calls it while checking the config, before any data or policy is built, and again when it builds the
backend, so a backend whose library is optional (vLLM) imports it there and nowhere else. A backend registered
without options is built with `(model, tokenizer)` alone; `set_backend_options` gives it one later (for knobs
read by code above this package). `get_backend` of an unknown name raises `UnknownBackendError`, one line
listing the registered names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from stepopsd.errors import UserError
from stepopsd.registry import Registry, modules

Options = Callable[[Any], dict]  # the run config -> the factory's keyword arguments
BUILTIN = ("stepopsd.policy.backends.hf", "stepopsd.policy.backends.vllm")  # register on import (no vLLM import)


class UnknownBackendError(UserError, ValueError):
    """`rollout.backend=<name>` names no registered backend: one line listing the registered ones."""


@dataclass(frozen=True)
class BackendEntry:
    name: str
    factory: Callable[..., Any]  # (model, tokenizer, **kwargs) -> GenerationBackend
    options: Options | None = None

    def kwargs(self, cfg) -> dict:
        """The factory's keyword arguments from the run config (checked); {} without an options hook."""
        return dict(self.options(cfg)) if self.options is not None else {}

    def build(self, model, tokenizer, **kwargs):
        return self.factory(model, tokenizer, **kwargs)


_REGISTRY: dict[str, BackendEntry] = {}  # a module attribute, so that a test may register into a copy
_BACKENDS: Registry[BackendEntry] = Registry(
    "generation backend", "rollout.backend", UnknownBackendError, "stepopsd/policy/backends/", listing="choose one of",
    discover=modules(*BUILTIN), origin=lambda entry: entry.factory, store=lambda: _REGISTRY)


def register_backend(name: str, *, options: Options | None = None):
    """Decorator: register a backend factory (a class or a function) under `name`."""
    def entry(factory, old: BackendEntry | None) -> BackendEntry:
        keep = old.options if old is not None else None
        return BackendEntry(name, factory, options if options is not None else keep)
    return _BACKENDS.register(name, entry)


def set_backend_options(name: str, options: Options) -> None:
    """Give the registered backend `name` the hook that reads its keyword arguments from the run config."""
    entry = get_backend(name)
    _REGISTRY[name] = BackendEntry(entry.name, entry.factory, options)


def backend_names() -> list[str]:
    return _BACKENDS.names()


def get_backend(name: str) -> BackendEntry:
    """The registered backend `name`; `UnknownBackendError` (one line) for any other."""
    return _BACKENDS.get(name)
