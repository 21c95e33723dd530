"""Evaluate a policy: `python eval.py experiment=alfworld_heat machine=cpu [policy=DIR] [eval.split=...]`.

Rolls out `eval.samples` episodes per task of `eval.split` (default: the first of `data.val_splits`) with the same loop, environment and
prompts as training (temperature `rollout.val_temperature`), and reports success per task type,
(Search-QA: exact match per data source), labelled with the data it ran on (generated or official). `policy` is a folder written by
`save_pretrained` (a run's `<run dir>/policy`) or a hub id; left out, it is the experiment's own
starting policy (the model config; for `machine=cpu` the SFT warm start of the tiny policy).
Writes `eval.json` into the run directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict

from omegaconf import DictConfig

from stepopsd.policy.loading import load_policy
from stepopsd.rollout import rollout
from stepopsd.build import (backend_factory, build_policy, check_services, env_factory, load_split, prepare_data,
                            retrieval_service)
from stepopsd.config import ConfigError, check_config, check_splits


def evaluate(cfg: DictConfig) -> dict:
    _, _, rollout_cfg = check_config(cfg)
    e = cfg.eval
    if e.samples < 1:
        raise ConfigError(f"eval.samples={e.samples} must be >= 1")
    check_splits(cfg, e.split, "eval.split")
    if e.policy and not os.path.isdir(e.policy) and os.path.sep in e.policy:
        raise ConfigError(f"eval.policy={e.policy}: no such folder (a run saves its policy to <run dir>/policy)")
    data = prepare_data(cfg)
    tasks = load_split(cfg, data, e.split, cfg.data.val_task_types, limit=e.limit)
    label = "+".join(sorted({t.data_label for t in tasks}))
    check_services(cfg, data)  # the corpus or the retriever's URL, before the policy
    policy, tokenizer = load_policy(e.policy, dtype=cfg.model.dtype) if e.policy else build_policy(cfg, data, tasks)
    sampling = dataclasses.replace(rollout_cfg.sampling, temperature=cfg.rollout.val_temperature)
    run_cfg = dataclasses.replace(rollout_cfg, group_size=e.samples, sampling=sampling)
    backend = backend_factory(cfg)(policy, tokenizer)
    with retrieval_service(cfg, data) as retriever, env_factory(cfg, retriever)() as env:
        trajectories, stats = rollout(env, backend, tokenizer, tasks, run_cfg, seed=cfg.seed)
    won, seen = defaultdict(int), defaultdict(int)
    for t in trajectories:
        won[t.task.task_type] += t.success
        seen[t.task.task_type] += 1
    metric = cfg.env.success_metric  # success (ALFWorld) or em (Search-QA), per task type / data source
    result = {"data": label, "split": e.split, "metric": metric, "policy": e.policy or "starting policy", "episodes": len(trajectories),
              metric: sum(won.values()) / len(trajectories),
              f"{metric}_by_type": {k: won[k] / seen[k] for k in sorted(seen)},
              "failed_trajectories": stats.failed_trajectories,
              "mean_steps": stats.steps / len(trajectories)}
    print(f"[{label} data] {e.split}: {metric} {sum(won.values())}/{len(trajectories)} = {result[metric]:.3f} "
          f"({', '.join(f'{k} {v:.3f}' for k, v in result[f'{metric}_by_type'].items())})")
    out = os.path.join(cfg.paths.output_dir, "eval.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result
