"""Train a run from its config: `python train.py experiment=alfworld_heat [machine=cpu]`.

`train` reads top to bottom: check the config (`stepopsd/config.py`: every knob, and the checkpoint to resume
from, before any expensive work), then build the data, policy and services, and the Trainer from a `Run`
(`stepopsd/build.py`), fit, save the policy and return the objective a sweeper optimises: the mean of the last
`optimized_last_k` values of `optimized_metric` (default: the overall success, Search-QA exact match, on the
FIRST split of `data.val_splits`, `val/valid_seen/success` in the ALFWorld paper configs).
"""
from __future__ import annotations

import os

import lightning as L
import optuna
from omegaconf import DictConfig

from stepopsd.build import (Run, build_policy, build_trainer, check_services, env_factory, load_split, prepare_data,
                            retrieval_service)
from stepopsd.config import check_config, check_objective, resume_from
from stepopsd.launch import rank_zero_first
from stepopsd.progress import setup_console
from stepopsd.sweep import objective


def train(cfg: DictConfig) -> float:
    """Train the configured run; returns its objective (`optimized_metric`, for a sweep)."""
    ppo, estimator, rollout_cfg = check_config(cfg)
    ckpt_path, _ = resume_from(cfg)  # the checkpoint read and checked against this config before any work
    setup_console()  # Lightning's log lines once (Hydra's console and file); stdout line-buffered in batch logs
    L.seed_everything(cfg.seed, workers=True)
    with rank_zero_first("the data"):  # torchrun / srun: rank 0 writes data.path, the other ranks then read it
        data = prepare_data(cfg)
    train_tasks = load_split(cfg, data, cfg.data.train_split, cfg.data.task_types)
    val_tasks = {split: load_split(cfg, data, split, cfg.data.val_task_types, limit=cfg.val_tasks) for split in cfg.data.val_splits}
    label = "+".join(sorted({t.data_label for t in train_tasks}))
    objective_name = check_objective(cfg, val_tasks)
    counts = ", ".join(f"{len(v)} {k}" for k, v in val_tasks.items())
    print(f"[{label} data] {len(train_tasks)} training and {counts} validation tasks ({cfg.env.name}); "
          f"algorithm={cfg.algorithm.name}")
    check_services(cfg, data)  # the corpus a run-owned retriever will serve, or the retriever's URL: before the policy
    with rank_zero_first("the policy"):  # rank 0 builds the tiny policy's cache (or fills the hub cache) first
        policy, tokenizer = build_policy(cfg, data, train_tasks)
    with retrieval_service(cfg, data) as retriever:
        run = Run(cfg, ppo, estimator, rollout_cfg, train_tasks, val_tasks, policy, tokenizer,
                  env_factory(cfg, retriever), label, objective_name, ckpt_path)
        trainer, module, datamodule, validation, reporter = build_trainer(run)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        save_policy(run, trainer, module, validation)
        if reporter is not None and reporter.pruned is not None:
            raise optuna.TrialPruned(f"pruned at step {reporter.pruned} ({objective_name})")
        value = objective(validation.records, objective_name, cfg.optimized_last_k)
        if trainer.is_global_zero:
            print(f"[{label} data] objective {objective_name} (mean of the last {cfg.optimized_last_k}): {value:.4f}")
        return value


def save_policy(run: Run, trainer: L.Trainer, module, validation) -> None:
    """The trained policy and its tokenizer into `<run dir>/policy` (trainer=fsdp: the shards gathered on rank 0,
    every rank taking part), and the validation histories printed."""
    full = module.full_state_dict()
    if trainer.is_global_zero:
        final = os.path.join(run.cfg.paths.output_dir, "policy")
        if full is None:
            run.policy.save_pretrained(final)
        else:
            run.policy.save_pretrained(final, state_dict=full)
        run.tokenizer.save_pretrained(final)
        for split, history in validation.histories.items():
            print(f"[{run.label} data] validation {run.cfg.env.success_metric} on {split} by step: {history}")
        print(f"[{run.label} data] policy saved to {final}")
