"""RolloutDataModule: every training batch is a fresh on-policy rollout.

The train dataloader is an iterable over `RolloutBatch`es: each item picks the next
`tasks_per_step` tasks (a seeded shuffle of the training games, resumable by position), rolls out
`group_size` copies of each with the *current* policy weights and returns the built batch. Groups
are built whole, so a group never spans two batches; under DDP each rank rolls out its own share
of tasks (rank r takes tasks r, r + world, ...), so groups stay whole on one rank. A broken environment on
any rank stops every rank in the same step with the same line (`stepopsd.ranks.agreed_problem`).
"""
from __future__ import annotations

import contextlib
import random
import time
from typing import Callable, Iterator

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from stepopsd import ranks
from stepopsd.data.batch import RolloutBatch, build_batch
from stepopsd.errors import RunFailed
from stepopsd.faults import maybe_kill
from stepopsd.rollout import RolloutConfig, RolloutStats, rollout
from stepopsd.types import Task


class EnvFailureError(RunFailed, RuntimeError):
    """More of a batch's trajectories failed than `rollout.max_failed_fraction` allows: one line."""


class _Rollouts(IterableDataset):
    def __init__(self, dm: "RolloutDataModule"):
        self.dm = dm

    def __iter__(self) -> Iterator[RolloutBatch]:
        while True:
            yield self.dm.next_batch()


class RolloutDataModule(L.LightningDataModule):
    """`env_factory()` builds the environment once per process; `backend_factory(policy, tokenizer)`
    builds the generation backend over the LightningModule's policy at fit start."""

    def __init__(self, tasks: list[Task], env_factory: Callable, backend_factory: Callable, tokenizer,
                 rollout_cfg: RolloutConfig, *, tasks_per_step: int, seed: int = 0,
                 max_failed_fraction: float = 0.5):
        super().__init__()
        if tasks_per_step < 1:
            raise ValueError(f"tasks_per_step={tasks_per_step} must be >= 1")
        if not 0 <= max_failed_fraction <= 1:
            raise ValueError(f"rollout.max_failed_fraction={max_failed_fraction}: need a fraction in [0, 1]")
        self.max_failed_fraction = max_failed_fraction
        self.tasks = list(tasks)
        self.env_factory, self.backend_factory = env_factory, backend_factory
        self.tokenizer, self.rollout_cfg = tokenizer, rollout_cfg
        self.tasks_per_step, self.seed = tasks_per_step, seed
        self.position = 0  # tasks consumed so far (checkpointed: resume continues the same order)
        self.batches = 0
        self.env = self.backend = self.policy = None
        self.full_weights = contextlib.nullcontext
        self.last_stats: RolloutStats | None = None
        self.last_metrics: dict = {}

    # --- state kept in checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.batches = state["position"], state["batches"]

    # --- rollouts ----------------------------------------------------------------------------------
    def attach(self, policy, full_weights: Callable | None = None) -> None:
        """Point generation at the policy being trained (called by the trainer's fit-start hook). `full_weights`
        (GRPOModule.full_weights) is entered around every rollout: under trainer=fsdp it gathers the shards."""
        self.policy = policy
        self.full_weights = full_weights or contextlib.nullcontext
        with self.full_weights():  # vLLM: the engine is built and gets the policy's weights
            self.backend = self.backend_factory(policy, self.tokenizer)
        if self.env is None:
            self.env = self.env_factory()

    @contextlib.contextmanager
    def generation(self, trainer=None):
        """The backend, ready to roll out with the policy's current weights: in the trainer's compute precision
        (bf16-mixed: autocast over the fp32 weights), under trainer=fsdp inside the gathered full weights, and
        after `sync_weights` (HF: the module itself; vLLM: the weights pushed into the engine, which the
        trainer's log-prob check verifies every step). A backend that can sleep (vLLM sleep_level > 0) sleeps
        afterwards, so the update has the GPU memory."""
        precision = trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()
        with precision, self.full_weights():
            self.backend.sync_weights(self.policy)
            try:
                yield self.backend
            finally:
                self.backend.sleep()  # a no-op unless the backend frees memory (vLLM sleep_level > 0)

    def _rank_tasks(self, count: int) -> list[Task]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        picked, orders = [], {}
        for i in range(count * world):
            epoch, j = divmod(self.position + i, len(self.tasks))
            if epoch not in orders:  # one seeded shuffle per pass over the tasks
                orders[epoch] = random.Random(self.seed * 7919 + epoch).sample(range(len(self.tasks)), len(self.tasks))
            if i % world == rank:
                picked.append(self.tasks[orders[epoch][j]])
        self.position += count * world
        return picked

    def next_batch(self) -> RolloutBatch:
        if self.backend is None:
            raise RuntimeError("RolloutDataModule.attach(policy) must run before rollouts (the trainer does it)")
        tasks = self._rank_tasks(self.tasks_per_step)
        t0 = time.perf_counter()
        rank = self.trainer.global_rank if self.trainer else 0
        with self.generation(self.trainer) as backend:
            step = self.batches + 1  # the training step this batch is for
            trajectories, stats = rollout(self.env, backend, self.tokenizer, tasks, self.rollout_cfg,
                                          seed=self.seed + 100_003 * self.batches + rank,
                                          after_turn=lambda turn: turn == 0 and maybe_kill("rollout", step))
        problem = self._failures(trajectories)
        if problem is None:
            try:
                batch, metrics = build_batch(trajectories, pad_id=self.tokenizer.pad_token_id)
            except RuntimeError as e:  # failures left no group of two: nothing to train on
                problem = f"{e}; resume with resume=auto"
        problem = ranks.agreed_problem(problem)  # one rank's broken env stops every rank in this step
        if problem is not None:
            raise EnvFailureError(f"training step {step}: {problem}")
        seconds = time.perf_counter() - t0
        self.batches += 1
        self.last_stats = stats
        self.last_metrics = metrics | {
            "time/rollout_s": seconds, "time/generate_s": stats.generate_s, "time/env_s": stats.env_s,
            "perf/gen_tokens_per_s": stats.generated_tokens / max(stats.generate_s, 1e-9),
            "rollout/truncated_prompts": stats.truncated_prompts,
        }
        return batch

    def _failures(self, trajectories) -> str | None:
        """Failed trajectories (env crash, timeout, retriever gone) are dropped and counted by `build_batch`;
        past `max_failed_fraction` of one batch the environment is broken, not flaky: the run-stopping problem
        (decided with the other ranks' in `next_batch`), else None."""
        failed = sum(t.failed for t in trajectories)
        if failed <= self.max_failed_fraction * len(trajectories):
            return None
        errors = sorted({s.transition.state.error for t in trajectories if t.failed for s in t.steps[-1:]} - {""})
        return (f"{failed} of {len(trajectories)} trajectories failed, more than "
                f"rollout.max_failed_fraction={self.max_failed_fraction} (e.g. {errors[0] if errors else 'a failed reset'}); "
                "the environment is broken, not flaky: see the env warnings in the log, raise "
                "env.step_timeout for slow engines, then resume with resume=auto")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rollouts(self), batch_size=None, num_workers=0, collate_fn=lambda b: b)

    def teardown(self, stage: str) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        if self.backend is not None:
            self.backend.close()  # vLLM: the engine's memory goes back (HF: a no-op)
            self.backend = None
