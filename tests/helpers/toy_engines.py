"""Toy engines for the worker-pool tests (importable by spawned workers: tests/ is on their sys.path)."""
from __future__ import annotations

import os
import time


class CounterEngine:
    """reset(source) -> "source:0"; each step -> "source:n". Special commands (and source "crash") misbehave."""

    def __init__(self) -> None:
        self.source, self.n = "", 0

    def reset(self, source: str) -> str:
        if source == "crash":
            os._exit(3)
        self.source, self.n = source, 0
        return f"{source}:0"

    def step(self, command: str):
        if command == "crash":
            os._exit(3)
        if command == "hang":
            time.sleep(1000)
        if command == "raise":
            raise RuntimeError("boom")
        if command == "unpicklable":
            return lambda: None
        if command.startswith("sleep:"):
            time.sleep(float(command.split(":", 1)[1]))
        if command == "pid":
            return os.getpid()
        self.n += 1
        return f"{self.source}:{self.n}"
