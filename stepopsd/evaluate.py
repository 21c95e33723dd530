"""Evaluate a policy: `python eval.py experiment=alfworld_heat machine=cpu [policy=DIR] [eval.split=...]`.

Rolls out `eval.samples` episodes per task of `eval.split` (default: the first of `data.val_splits`) with the same loop, environment and
prompts as training (temperature `rollout.val_temperature`), and reports success per task type,
(Search-QA: exact match per data source), labelled with the data it ran on (generated or official). `policy` is a folder written by
`save_pretrained` (a run's `<run dir>/policy`) or a hub id; left out, it is the experiment's own
starting policy (the model config; for `machine=cpu` the SFT warm start of the tiny policy).
Writes `eval.json` into the run directory. `probe_policy` is the Monte-Carlo credit probe of the same policy
(`python probe.py ...`, `stepopsd.probe`): it writes `probe.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict

from omegaconf import DictConfig, OmegaConf

from stepopsd.policy.loading import load_policy
from stepopsd.rollout import rollout
from stepopsd.build import (backend_factory, build_policy, check_services, env_factory, load_split, peer_lines,
                            prepare_data, retrieval_service)
from stepopsd.config import ConfigError, check_config, check_probe, check_splits, env_spec
from stepopsd.estimators import Context, Services, estimator_names
from stepopsd.probe import ProbeResult, probe, probe_estimators, report


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


def probe_policy(cfg: DictConfig) -> ProbeResult:
    """`python probe.py experiment=... [machine=cpu] [eval.policy=DIR] [eval.split=...] [probe.*=...]`:
    the probe on `probe.tasks` tasks of `eval.split` with the policy `eval.policy` (default: the experiment's starting
    policy), at the training rollout's temperature and group size; prints the table, writes probe.json."""
    _, _, rollout_cfg = check_config(cfg)
    knobs = check_probe(cfg)
    names = list(knobs.estimators) or estimator_names()
    check_splits(cfg, cfg.eval.split, "eval.split")
    if cfg.eval.policy and not os.path.isdir(cfg.eval.policy) and os.path.sep in cfg.eval.policy:
        raise ConfigError(f"eval.policy={cfg.eval.policy}: no such folder (a run saves its policy to <run dir>/policy)")
    data = prepare_data(cfg)
    tasks = load_split(cfg, data, cfg.eval.split, cfg.data.val_task_types, limit=knobs.tasks)
    label = "+".join(sorted({t.data_label for t in tasks}))
    check_services(cfg, data)
    policy, tokenizer = (load_policy(cfg.eval.policy, dtype=cfg.model.dtype) if cfg.eval.policy
                         else build_policy(cfg, data, tasks))
    backend = backend_factory(cfg)(policy, tokenizer)
    estimators = probe_estimators(names, OmegaConf.to_container(cfg.env, resolve=True))
    services = Services(tokenizer=tokenizer, temperature=rollout_cfg.sampling.logprob_temperature,
                        peer_lines=peer_lines(cfg), anchor_similarity=cfg.env.anchor_similarity)
    for estimator in estimators.values():
        estimator.setup(policy, services)
    with retrieval_service(cfg, data) as retriever, env_factory(cfg, retriever)() as env:
        result = probe(env, backend, tokenizer, tasks, rollout_cfg, estimators, knobs, ctx=Context(step=0, policy=policy),
                       exact=env_spec(cfg).exact_credit(cfg))
    print(report(result, label))
    out = os.path.join(cfg.paths.output_dir, "probe.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"data": label, "split": cfg.eval.split, "policy": cfg.eval.policy or "starting policy",
                   "probe": dataclasses.asdict(knobs), "metrics": result.metrics,
                   "steps": [{"task": result.trajectories[e.traj].task.task_id, "member": result.trajectories[e.traj].member,
                              "step": e.step, "mc_advantage": e.advantage, "se": e.se, "q": e.q, "v": e.v,
                              **({"exact": result.exact[i], "pivotal": result.pivotal[i]} if result.exact else {}),
                              "credit": {name: c[i] for name, c in result.credit.items()}}
                             for i, e in enumerate(result.estimates)]}, f, indent=1)
    return result
