"""The training progress bar, `callbacks.progress_bar`: `auto` (the default) draws the rich bar on a terminal
and prints plain lines otherwise (batch logs); `rich`, `tqdm` and `plain` force one.

The plain bar prints one flushed line per training step and one at the start and the end of each validation
(`RolloutValidation` calls it), on global rank 0:

    [validation] step 0 · valid_seen 16 tasks x 4 samples
    [validation] step 0 · 41s · valid_seen success 0.172 (11/64)
    [train] step 1/20 · 5 % · 9.8s · success/rate 0.250 · reward/mean 1.225 · time/rollout_s 3.812 · ETA 3m06s

A step's seconds are the wall time since the previous step ended (or the fit started) less the validation in
between; the ETA is the mean of this run's steps times the steps left (validations not counted).
"""
from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from stepopsd.progress import duration, fields, on_terminal

PROGRESS_BARS = ("auto", "rich", "tqdm", "plain")


class PlainProgressBar(ProgressBar):
    """Plain lines for batch logs (see the module doc); `clock` is injectable for tests."""

    def __init__(self, stream=None, clock=time.monotonic):
        super().__init__()
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        self.enabled = True
        self.steps: list[float] = []  # this run's step seconds
        self.mark = self.val_start = None
        self.paused = 0.0  # validation seconds since `mark`

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            print(*args, file=self.stream, flush=True, **kwargs)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.mark, self.paused = self.clock(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        seconds = now - self.mark - self.paused
        self.mark, self.paused = now, 0.0
        self.steps.append(seconds)
        step, total = trainer.current_epoch + 1, trainer.max_epochs
        eta = sum(self.steps) / len(self.steps) * (total - step)
        self.print(" · ".join([f"[train] step {step}/{total}", f"{100 * step / total:.0f} %", duration(seconds),
                               *fields(trainer.progress_bar_metrics), f"ETA {duration(eta)}"]))

    def validation_start(self, step: int, tasks: dict[str, int], samples: int) -> None:
        self.val_start = self.clock()
        counts = ", ".join(f"{split} {n}" for split, n in tasks.items())
        self.print(f"[validation] step {step} · {counts} tasks x {samples} samples")

    def validation_end(self, step: int, results: list[str]) -> None:
        """`results`: one text per split (`valid_seen success 0.172 (11/64)`)."""
        seconds = self.clock() - self.val_start
        self.paused += seconds
        self.print(" · ".join([f"[validation] step {step}", duration(seconds), *results]))


def progress_bar(kind: str) -> ProgressBar:
    """The `callbacks.progress_bar` callback; `auto` is rich on a terminal, plain lines otherwise."""
    if kind == "auto":
        kind = "rich" if on_terminal() else "plain"
    return {"rich": RichProgressBar, "tqdm": TQDMProgressBar, "plain": PlainProgressBar}[kind]()
