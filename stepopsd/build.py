"""Build a run from its checked config: the policy, the generation backend, the environment's data, services
and env factory, then (from a `Run` record) the datamodule, the `GRPOModule`, the callbacks and the Trainer.

The config picks; these functions instantiate objects and hand them to each other (objects never receive the
config). `stepopsd/train.py`, `evaluate.py`, `sft.py` and the benchmarks build with them; the checks they rely on
ran before, in `stepopsd/config.py`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from stepopsd.callbacks.advantages import AdvantageStage
from stepopsd.callbacks.preemption import Preemption
from stepopsd.callbacks.probe import CreditProbe
from stepopsd.callbacks.progress import progress_bar
from stepopsd.callbacks.rollouts import RolloutLogging, RolloutValidation
from stepopsd.checkpoints import AtomicCheckpointIO, check_compatible, read_checkpoint
from stepopsd.config import check_probe, env_spec
from stepopsd.data.datamodule import RolloutDataModule
from stepopsd.estimators import Estimator, Services, estimator_names
from stepopsd.launch import sharded, trainer_kwargs
from stepopsd.memory import check_memory
from stepopsd.module import GRPOModule, PPOConfig
from stepopsd.policy.backends.registry import get_backend
from stepopsd.policy.loading import DTYPES, load_policy, load_tokenizer, random_policy, task_tokenizer
from stepopsd.policy.sharding import ShardingConfig
from stepopsd.policy.tiny import count_parameters
from stepopsd.probe import probe_estimators
from stepopsd.rollout import RolloutConfig
from stepopsd.sft import TinySFTConfig, ensure_tiny_policy
from stepopsd.sweep import trial_reporter
from stepopsd.types import Task


def backend_factory(cfg: DictConfig):
    """backend_factory(policy, tokenizer) -> the configured `GenerationBackend`: the factory registered as
    `rollout.backend`, with the keyword arguments its options hook reads from `cfg`."""
    backend = get_backend(cfg.rollout.backend)
    return functools.partial(backend.factory, **backend.kwargs(cfg))


def prepare_data(cfg: DictConfig) -> str:
    """The data folder; generated into `data.path` first when the config asks for it and it is missing."""
    return env_spec(cfg).prepare_data(cfg)


def load_split(cfg: DictConfig, data: str, split: str, types, limit: int | None = None) -> list[Task]:
    """Tasks of one split: ALFWorld games of the given task types, or Search-QA questions of the given data sources."""
    return env_spec(cfg).load_split(cfg, data, split, types, limit=limit)


def check_services(cfg: DictConfig, data: str) -> None:
    """The inputs of the environment's services (Search-QA: the corpus or the retriever's URL), checked before
    the policy is built (minutes for the tiny one)."""
    env_spec(cfg).check_services(cfg, data)


def retrieval_service(cfg: DictConfig, data: str):
    """A context manager: the environment's services for the run (Search-QA: the retriever's URL, or a run-owned
    `stepopsd-retriever` started and stopped with the run); yields what `env_factory` takes (None for ALFWorld)."""
    return env_spec(cfg).services(cfg, data)


def build_policy(cfg: DictConfig, data: str, tasks: list[Task] = ()):
    """(policy, tokenizer): the tiny policy (built and cached locally), a hub / local checkpoint, or with
    model.init=random the named architecture's shapes with random weights (no hub access) and a word-level
    tokenizer trained on `tasks`' text (or the `model.tokenizer` folder)."""
    m = cfg.model
    if m.kind == "tiny":
        sft = TinySFTConfig(data=data, env=cfg.env.name, corpus=env_spec(cfg).corpus(cfg, data),
                            architecture=OmegaConf.to_container(m.architecture), vocab_size=m.vocab_size,
                            task_types=tuple(cfg.data.task_types),
                            compact=cfg.env.compact, history_length=cfg.env.history_length,
                            chat_template=m.chat_template, chat_template_kwargs=OmegaConf.to_container(m.chat_template_kwargs),
                            **OmegaConf.to_container(m.sft))
        folder = ensure_tiny_policy(sft, cfg.paths.cache_dir, workers=cfg.env.get("num_workers"))
        policy, tokenizer = load_policy(folder, dtype=m.dtype)
    elif m.init == "random":
        tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else task_tokenizer(tasks)
        policy = random_policy(OmegaConf.to_container(m.arch), tokenizer, dtype=m.dtype, seed=cfg.seed)
        print(f"[model.init=random] {m.arch.model_type} with {count_parameters(policy):,} random parameters "
              f"(shapes only: no pretrained weights), tokenizer of {len(tokenizer)} tokens")
    else:
        policy, tokenizer = load_policy(m.name_or_path, dtype=m.dtype)
    if m.get("gradient_checkpointing"):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, tokenizer


def env_factory(cfg: DictConfig, retriever=None):
    """A no-argument callable building the configured environment (in each process that needs one); Search-QA
    takes the retriever of `retrieval_service` (a URL, or the run's own server, whose clients restart it)."""
    return env_spec(cfg).env_factory(cfg, retriever)


def peer_lines(cfg: DictConfig):
    """The environment's hindsight peer serialisation (spec §6)."""
    return env_spec(cfg).peer_lines


def credit_probe(cfg: DictConfig, run: "Run", services: Services) -> CreditProbe:
    """The training-time credit probe on the first `probe.tasks` tasks of the first validation split."""
    knobs = check_probe(cfg)
    estimators = probe_estimators(list(knobs.estimators) or estimator_names(), OmegaConf.to_container(cfg.env, resolve=True))
    tasks = next(iter(run.val_tasks.values()))[:knobs.tasks]
    return CreditProbe(knobs, tasks, estimators, services, run.rollout_cfg, exact=env_spec(cfg).exact_credit(cfg))


@dataclass(frozen=True)
class Run:
    """Everything `build_trainer` wires together, built and checked by `stepopsd.train.train`: the config and
    what `check_config` / `resume_from` made of it, the tasks, the policy, and the environment."""
    cfg: DictConfig                      # the run's config (the trainer's, callbacks' and paths' knobs)
    ppo: PPOConfig                       # typed configs and the advantage estimator (`check_config`)
    estimator: Estimator
    rollout_cfg: RolloutConfig
    train_tasks: list[Task]              # the training split
    val_tasks: dict[str, list[Task]]     # each validation split's tasks, by split name
    policy: object                       # the trained model (a transformers causal LM) and its tokenizer
    tokenizer: object
    make_env: Callable[[], object]       # a no-argument env factory (`env_factory`)
    label: str                           # the data the tasks come from (generated / official), for log lines
    objective_name: str                  # the logged metric `train` returns (`check_objective`)
    ckpt_path: str | None = None         # the checkpoint the run starts from (`resume_from`), or None


def build_trainer(run: Run):
    """(trainer, module, datamodule, validation, reporter) for `trainer.fit(module, datamodule=datamodule,
    ckpt_path=run.ckpt_path)`; `validation` holds the records the objective is read from, `reporter` a sweep
    trial's pruning (None outside one). A checkpoint of another model or algorithm is refused here (one line),
    and on CUDA the memory model is checked against the card's free memory."""
    cfg, ppo, tokenizer = run.cfg, run.ppo, run.tokenizer
    datamodule = RolloutDataModule(run.train_tasks, run.make_env, backend_factory(cfg), tokenizer, run.rollout_cfg,
                                   tasks_per_step=cfg.tasks_per_step, seed=cfg.seed,
                                   max_failed_fraction=cfg.rollout.max_failed_fraction)
    frozen = DTYPES[cfg.model.get("frozen_dtype", cfg.model.dtype)]
    sharding = ShardingConfig(**OmegaConf.to_container(cfg.trainer.fsdp)) if sharded(cfg.trainer) else None
    module = GRPOModule(run.policy, ppo, frozen_dtype=frozen, sharding=sharding)
    reporter = trial_reporter(cfg.get("trial"), run.objective_name)  # a sweep trial's pruning (stepopsd/sweep.py)
    validation = RolloutValidation(run.val_tasks, run.rollout_cfg, every=cfg.val_every,
                                   temperature=cfg.rollout.val_temperature, samples=cfg.val_samples, seed=cfg.seed,
                                   metric=cfg.env.success_metric, report=reporter)
    # One Lightning epoch = one training step (a rollout batch and its PPO update): checkpoints, resume
    # and the progress bar count training steps, not PPO's several optimizer steps per batch.
    every = cfg.callbacks.checkpoint_every or cfg.training_steps
    checkpoints = os.path.join(cfg.paths.output_dir, "checkpoints")
    services = Services(tokenizer=tokenizer, temperature=ppo.temperature, peer_lines=peer_lines(cfg), frozen_dtype=frozen,
                        anchor_similarity=cfg.env.anchor_similarity, exact_credit=env_spec(cfg).exact_credit(cfg))
    callbacks = [RolloutLogging(), AdvantageStage(run.estimator, services), validation,
                 Preemption(checkpoints, requeue=cfg.callbacks.requeue),
                 ModelCheckpoint(dirpath=checkpoints, filename="step{train_step:04.0f}",
                                 auto_insert_metric_name=False, every_n_epochs=every, save_top_k=cfg.callbacks.keep_checkpoints,
                                 save_last=True, save_on_train_epoch_end=True),
                 progress_bar(cfg.callbacks.progress_bar)]
    if cfg.probe.every:  # the credit probe every N training steps (stepopsd/probe.py)
        callbacks.append(credit_probe(cfg, run, services))
    if run.ckpt_path is not None and not sharded(cfg.trainer):  # another model or algorithm: one line, not a page
        check_compatible(read_checkpoint(run.ckpt_path, mmap=True), run.ckpt_path, module, run.estimator.name)
    trainer = L.Trainer(max_epochs=cfg.training_steps, limit_train_batches=1, logger=instantiate(cfg.logger), callbacks=callbacks,
                        log_every_n_steps=1, num_sanity_val_steps=0, enable_model_summary=False,
                        default_root_dir=cfg.paths.output_dir,
                        plugins=[] if sharded(cfg.trainer) else [AtomicCheckpointIO()], **trainer_kwargs(cfg.trainer))
    check_memory(cfg, run.policy, trainer)  # CUDA: the memory model vs the card's free memory (stepopsd/memory.py)
    return trainer, module, datamodule, validation, reporter
