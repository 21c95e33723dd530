"""Pre-emption: SIGTERM or SIGUSR1 (SLURM's warning before a time limit or pre-emption) saves a checkpoint at
the end of the current training step and exits cleanly; `resume=auto` then continues the run.

Lightning turns SIGTERM into a clean stop at the end of the epoch (one training step here) but saves
nothing; its SLURM SIGUSR1 handler saves at once, in the middle of a rollout or an update, which cannot be
resumed exactly. Both signals here only raise a flag; `last.ckpt` is written (atomically) once the step is
whole, then the process stops. Under SLURM with `requeue`, SIGUSR1 also requeues the job (`scontrol
requeue`); the requeued job, started with `resume=auto`, finds its run folder and continues.
"""
from __future__ import annotations

import os
import signal
import subprocess

import lightning as L


class Preemption(L.Callback):
    def __init__(self, dirpath: str, *, requeue: bool = False):
        self.dirpath = dirpath
        self.requeue = requeue
        self.signal: int | None = None
        self._previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's own handlers (registered once the fit starts), replacing its SLURM SIGUSR1 one
        self._previous = signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, self._flag)

    def _flag(self, signum, frame) -> None:
        self.signal = signum

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.signal is None and not trainer.received_sigterm:
            return
        signum = self.signal or signal.SIGTERM
        path = os.path.join(self.dirpath, "last.ckpt")
        trainer.save_checkpoint(path)
        step = trainer.current_epoch + 1
        if trainer.is_global_zero:
            print(f"[pre-empted] {signal.Signals(signum).name}: saved {path} after training step {step}; "
                  "continue with the same command and resume=auto", flush=True)
            job = os.environ.get("SLURM_JOB_ID")
            if self.requeue and signum == signal.SIGUSR1 and job:
                array = os.environ.get("SLURM_ARRAY_JOB_ID")
                job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
                subprocess.run(["scontrol", "requeue", job], check=False)
        trainer._signal_connector.received_sigterm = True  # Lightning stops after this epoch's hooks

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
