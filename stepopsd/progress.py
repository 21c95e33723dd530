"""Progress of long phases (game generation, demonstrations, SFT), for a terminal and for batch logs.

On a terminal (`sys.stdout.isatty()`) a phase draws a rich progress bar. Otherwise (`nohup python
train.py ... > log`, a scheduler's log file) it prints plain, flushed lines: the first and the last item
always, in between at most one line every `STEPOPSD_PROGRESS_EVERY` seconds (default 30):

    [sft] batch 30/100 · 30 % · 1m12s elapsed · ETA 2m48s · epoch 1/3 · loss 0.153

Training steps and validation have their own plain lines (`stepopsd/callbacks/progress.py`).
"""
from __future__ import annotations

import logging
import os
import sys
import time

from stepopsd.errors import UserError

EVERY_S = 30.0


def on_terminal(stream=None) -> bool:
    """Whether `stream` (default stdout) is a terminal, where rich bars draw."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def every_s() -> float:
    """Seconds between two plain progress lines: `STEPOPSD_PROGRESS_EVERY`, default 30 (0: every item)."""
    text = os.environ.get("STEPOPSD_PROGRESS_EVERY", "").strip()
    try:
        seconds = float(text) if text else EVERY_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"STEPOPSD_PROGRESS_EVERY={text!r}: give the seconds between progress lines, a number >= 0")
    return seconds


def duration(seconds: float) -> str:
    """9.84 -> '9.8s', 72 -> '1m12s', 3725 -> '1h02m'."""
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def fields(info: dict) -> list[str]:
    """`key value` texts; floats with 3 decimals."""
    return [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()]


def line(label: str, unit: str, done: int, total: int, elapsed: float, info: dict) -> str:
    """One plain progress line: what is done, how much is left (percent, ETA at the mean rate so far)."""
    parts = [f"[{label}] {unit} {done}/{total}", f"{100 * done / max(total, 1):.0f} %", f"{duration(elapsed)} elapsed"]
    if 0 < done < total:
        parts.append(f"ETA {duration(elapsed / done * (total - done))}")
    return " · ".join(parts + fields(info))


class Progress:
    """`with Progress("sft", total, "batch") as p: ... p.advance(loss=0.153)`: a rich bar on a terminal,
    plain lines otherwise (see the module doc); nothing at all with `enabled=False`."""

    def __init__(self, label: str, total: int, unit: str, *, description: str | None = None, enabled: bool = True,
                 stream=None, every: float | None = None, clock=time.monotonic):
        self.label, self.total, self.unit, self.clock = label, total, unit, clock
        self.stream = sys.stdout if stream is None else stream
        self.every = every_s() if every is None else every
        self.plain = enabled and not on_terminal(self.stream)
        self.bar = None
        if enabled and not self.plain:
            from rich.console import Console
            from rich.progress import Progress as RichProgress, TextColumn

            self.bar = RichProgress(*RichProgress.get_default_columns(), TextColumn("{task.fields[info]}"),
                                    console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task(description or label, total=total, info="")
        self.done, self.start = 0, clock()
        self.shown = self.last = None  # items done and time at the last plain line

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int = 1, **info) -> None:
        """`n` more items done; `info` (loss=..., epoch="2/3") goes on the line."""
        self.update(self.done + n, **info)

    def update(self, done: int, **info) -> None:
        """`done` items done in all."""
        self.done = done
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=" · ".join(fields(info)))
        elif self.plain:
            now = self.clock()
            if self.shown is None or self.done >= self.total > self.shown or now - self.last >= self.every:
                self.shown, self.last = self.done, now
                print(line(self.label, self.unit, self.done, self.total, now - self.start, info), file=self.stream,
                      flush=True)


def setup_console() -> None:
    """The run's console output, for a terminal and for batch logs; call after `lightning` is imported.

    Every Lightning log line once: the `lightning` logger has its own console handler (stderr) and also
    propagates to the root logger, to which Hydra's job logging gives a console handler (stdout) and the
    job's `.log` file, so each line came out twice. With root handlers present, Lightning's own are dropped
    (also those `lightning.pytorch` / `lightning.fabric` add when imported before the root had any), and its
    lines go through the root's, console and file. And when stdout is not a terminal it is made line-buffered,
    so a plain `print` reaches the log at once, not when a block fills."""
    if not on_terminal() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        own = logging.getLogger(name)
        for handler in [h for h in own.handlers if type(h) is logging.StreamHandler]:
            own.removeHandler(handler)
        own.propagate = True
