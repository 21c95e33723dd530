"""ALFWorld as a run uses it (`env=alfworld`): games under `<data.path>/json_2.1.1/<split>/`, generated offline when
`data.generate` asks for them, played by `AlfWorldEnv`'s engine workers; no service; peers written as their numbered
action lists; the tiny policy warm-started on expert episodes with epsilon-random detours."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

from stepopsd.envs.alfworld.env import AlfWorldEnv, load_tasks
from stepopsd.envs.alfworld.prompts import peer_lines
from stepopsd.envs.alfworld.tasks import SPLITS, resolve_task_types
from stepopsd.envs.registry import EnvConfig, EnvSpec, register_env

PEER_EXAMPLE = "1. go to countertop 1\n2. take apple 1 from countertop 1"  # a peer block in the tokenizer's texts


@dataclass
class AlfWorldConfig(EnvConfig):
    """ALFWorld protocol (environments.md): 50 steps, history 2, reward 10*won, invalid -0.1; the EnvConfig defaults."""

    num_workers: int = 2  # engine worker processes (about one per core)
    step_timeout: float = 60  # seconds an engine worker may take for one step before it is replaced


@register_env("alfworld")
class AlfWorldSpec(EnvSpec):
    config = AlfWorldConfig

    def check_splits(self, splits, key):
        if bad := [s for s in splits if s not in SPLITS]:
            raise ValueError(f"{key}: unknown ALFWorld split {bad[0]!r}: use {', '.join(SPLITS)}")

    def check_task_types(self, types, key):
        try:
            resolve_task_types(types)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None

    def prepare_data(self, cfg):
        path, gen = cfg.data.path, cfg.data.generate
        if gen is not None and path and not os.path.isdir(os.path.join(path, "json_2.1.1", cfg.data.train_split)):
            from stepopsd.envs.alfworld.generate import make_games

            print(f"[generated games] writing ALFWorld-format games to {path} (seed {gen.seed})")
            report = make_games(path, gen.seed, train_per_type=gen.train_per_type, valid_per_type=gen.valid_per_type,
                                task_types=list(cfg.data.task_types))
            print(report.table())
        return path

    def load_split(self, cfg, data, split, types, limit=None):
        return load_tasks(data, split, list(types), limit=limit)

    def env_factory(self, cfg, service=None):
        e = cfg.env
        return functools.partial(AlfWorldEnv, e.num_workers, max_steps=e.max_steps, step_timeout=e.step_timeout,
                                 require_think=e.require_think, history_length=e.history_length, compact=e.compact)

    peer_lines = staticmethod(peer_lines)

    def demonstrations(self, sft, path, workers, log):
        from stepopsd.envs.alfworld.demos import DemoOptions, export_demos

        tasks = load_tasks(sft.data, "train", list(sft.task_types))
        label = "+".join(sorted({t.data_label for t in tasks}))
        log(f"[{label} games] building the tiny policy: demonstrations from {len(tasks)} games x {sft.episodes_per_game} "
            f"episodes, tokenizer, SFT")
        export_demos(tasks * sft.episodes_per_game, path, DemoOptions(
            epsilon=sft.demo_epsilon, repeat=sft.demo_repeat, seed=sft.seed, compact=sft.compact,
            history_length=sft.history_length), workers)
        with open(path) as f:
            records = [json.loads(line) for line in f]
        return records, [], PEER_EXAMPLE, label
