"""Check a run's config before any work: every knob, the launch, the model folder, the data splits, the
checkpoint to resume from and the objective's name, each a one-line `ConfigError` (`stepopsd.errors`).

`check_config` returns the typed configs (PPO, rollout) and the advantage estimator; `resume_from` picks and
checks the checkpoint a run starts from. This module builds nothing: `stepopsd/build.py` builds the run from
what it returns.
"""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from stepopsd.algorithms.grpo import PPOConfig
from stepopsd.callbacks.progress import PROGRESS_BARS
from stepopsd.callbacks.rollouts import metric_prefix
from stepopsd.checkpoints import CheckpointError, last_good_checkpoint, read_checkpoint, remove_torn, steps_done, trim_metrics
from stepopsd.errors import UserError
from stepopsd.envs.registry import EnvSpec, get_env
from stepopsd.estimators import Estimator, build_estimator, estimator_names, get_estimator
from stepopsd.estimators.teacher_shaped import TeacherShaped
from stepopsd.hindsight import SKILL_ENVS
from stepopsd.launch import launch, sharded, world_size_mismatch
from stepopsd.policy.backends.base import SamplingParams
from stepopsd.policy.backends.registry import get_backend, set_backend_options
from stepopsd.policy.backends.vllm import VLLMConfig, check_unfiltered, import_vllm
from stepopsd.policy.loading import DTYPES, TASK_VOCAB, is_hub_id, load_tokenizer
from stepopsd.policy.sharding import ShardingConfig
from stepopsd.rollout import RolloutConfig
from stepopsd.schemas import check_schemas
from stepopsd.sft import TinySFTConfig
from stepopsd.sweep import check_metric, metric_name
from stepopsd.types import Task


class ConfigError(UserError, ValueError):
    """A bad knob, caught before any work starts."""


def check_probe(cfg: DictConfig):
    """The credit probe's knobs (`probe.*`, `stepopsd.probe.ProbeConfig`) and the estimators it compares: one line."""
    from stepopsd.probe import ProbeConfig

    try:
        knobs = ProbeConfig(**OmegaConf.to_container(cfg.probe, resolve=True))
        for name in knobs.estimators:
            get_estimator(name)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return knobs


def check_config(cfg: DictConfig) -> tuple[PPOConfig, Estimator, RolloutConfig]:
    """Validate every knob (one-line errors) and return the typed configs and the advantage estimator."""
    check_schemas(cfg)  # keys added with `+` that no schema has (stepopsd/schemas.py; the rest is Hydra's)
    if cfg.require_gpu and not torch.cuda.is_available():
        raise ConfigError("no GPU found: add machine=cpu to run this experiment on the CPU (tiny policy, generated games)")
    check_launch(cfg)
    if cfg.group_size < 2:
        raise ConfigError(f"group_size={cfg.group_size}: GRPO needs >= 2 rollouts per task")
    if cfg.training_steps < 1 or cfg.tasks_per_step < 1:
        raise ConfigError("training_steps and tasks_per_step must be >= 1")
    check_resume(cfg)
    if cfg.ckpt_path is not None and os.path.isdir(cfg.ckpt_path) and not sharded(cfg.trainer):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is a folder: a sharded trainer=fsdp checkpoint; resume it with trainer=fsdp")
    if cfg.ckpt_path is not None and not os.path.isfile(cfg.ckpt_path) and not (
            sharded(cfg.trainer) and os.path.isfile(os.path.join(cfg.ckpt_path, "meta.pt"))):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file (runs write them to <run dir>/checkpoints/; "
                          "trainer=fsdp: a folder)")
    if cfg.callbacks.checkpoint_every < 0:
        raise ConfigError(f"callbacks.checkpoint_every={cfg.callbacks.checkpoint_every}: use 0 (end only) or N >= 1")
    if cfg.callbacks.progress_bar not in PROGRESS_BARS:
        raise ConfigError(f"callbacks.progress_bar={cfg.callbacks.progress_bar}: use one of {', '.join(PROGRESS_BARS)}")
    e = cfg.env
    if e.max_steps < 1 or e.history_length < 0:
        raise ConfigError(f"env.max_steps={e.max_steps}, env.history_length={e.history_length}: need >= 1 and >= 0")
    spec = env_spec(cfg)  # the registered environment (an unknown env.name: one line listing the registered)
    env_check(spec.check, cfg)  # its own knobs (Search-QA: topk, penalty, retriever)
    check_splits(cfg, cfg.data.val_splits, "data.val_splits")
    for key in ("task_types", "val_task_types"):  # ALFWorld: task type names
        env_check(spec.check_task_types, cfg.data[key], f"data.{key}")
    if cfg.optimized_last_k < 1:
        raise ConfigError(f"optimized_last_k={cfg.optimized_last_k}: the objective is the mean of the last K >= 1 validations")
    if cfg.val_tasks is not None and cfg.val_tasks < 1:
        raise ConfigError(f"val_tasks={cfg.val_tasks}: use N >= 1 tasks per validation split, or null for all")
    try:  # the registered estimator `algorithm.name` picks, its knobs checked (an unknown name lists the registered)
        estimator = build_estimator(OmegaConf.to_container(cfg.algorithm, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    check_teacher_context(cfg, estimator)
    if getattr(estimator, "needs_exact_credit", False) and spec.exact_credit(cfg) is None:
        raise ConfigError(f"algorithm={cfg.algorithm.name} needs each step's exact credit, which env={cfg.env.name} does "
                          "not know: use env=credit (experiment=credit_early or credit_spread)")
    check_probe(cfg)
    check_precision(cfg)
    check_model(cfg)
    r = cfg.rollout
    try:
        ppo_knobs = OmegaConf.to_container(cfg.algorithm.ppo, resolve=True)  # ppo.temperature: rollout.temperature
        if ppo_knobs.get("rollout_is_cap") is None:  # null: TIS on for vLLM's systematic drift, off for hf
            ppo_knobs["rollout_is_cap"] = VLLM_ROLLOUT_IS_CAP if r.backend == "vllm" else 0.0
        ppo = PPOConfig(**ppo_knobs)
        sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        # the registered backend (an unknown name: one line listing the registered ones), its knobs, then whether
        # its library imports (vLLM): before any data or policy is built
        get_backend(r.backend).kwargs(cfg)
        rollout_cfg = RolloutConfig(group_size=cfg.group_size, max_prompt_tokens=r.max_prompt_tokens, sampling=sampling,
                                    chat_template=cfg.model.chat_template,
                                    chat_template_kwargs=OmegaConf.to_container(cfg.model.chat_template_kwargs),
                                    target_mode=cfg.algorithm.stepopsd.target_span if "stepopsd" in cfg.algorithm
                                    else cfg.env.target_span)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return ppo, estimator, rollout_cfg


# vLLM's keyword arguments are read with the trainer's knobs (`vllm_config` below); the other backends' by their
# own `options` hooks where they register (stepopsd/policy/backends/)
set_backend_options("vllm", lambda cfg: {"config": vllm_config(cfg), "seed": cfg.seed})
VLLM_ROLLOUT_IS_CAP = 2.0  # algorithm.ppo.rollout_is_cap when left null under rollout.backend=vllm


def vllm_config(cfg: DictConfig) -> VLLMConfig:
    """rollout.vllm as a VLLMConfig (dtype auto: the trainer's compute dtype; max_model_len null: prompt + response),
    checked with the sampling it must reproduce, then vLLM imported (ImportError -> one line naming the extra)."""
    r = cfg.rollout
    v = OmegaConf.to_container(r.vllm)
    if v["dtype"] == "auto":
        v["dtype"] = "bfloat16" if str(cfg.trainer.precision).startswith("bf16") else "float32"
    if v["max_model_len"] is None:
        v["max_model_len"] = r.max_prompt_tokens + r.max_new_tokens
    if v["max_model_len"] < r.max_prompt_tokens + r.max_new_tokens:
        raise ValueError(f"rollout.vllm.max_model_len={v['max_model_len']} < max_prompt_tokens + max_new_tokens "
                         f"({r.max_prompt_tokens + r.max_new_tokens}): raise it or leave it null")
    check_unfiltered(r.top_p, r.top_k)
    config = VLLMConfig(**v)
    try:
        import_vllm()
    except ImportError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    return config


def check_teacher_context(cfg: DictConfig, estimator: Estimator) -> None:
    """`algorithm.teacher.context` against the run (one line each): SDAR's skill documents (`skills`) need a
    teacher-shaped estimator, an environment whose task types map to documents (`stepopsd.hindsight.SKILL_ENVS`; any
    environment with `skill_all`) and a document for every task type of the training data; the folder itself was
    read when the estimator was built. Binds the environment to the estimator (its task types' documents)."""
    t, name, env = cfg.algorithm.teacher, cfg.algorithm.name, cfg.env.name
    if not isinstance(estimator, TeacherShaped):
        if t.context != "hindsight" or t.skills_dir or t.skill_all:
            shaped = [n for n in estimator_names() if issubclass(get_estimator(n), TeacherShaped)]
            raise ConfigError(f"algorithm.teacher.context={t.context}: algorithm={name} has no teacher (the teacher's "
                              f"context is a knob of {', '.join(shaped)})")
        return
    try:
        types = SKILL_ENVS[env].task_types(cfg) if t.context == "skills" and env in SKILL_ENVS else None
        estimator.bind_env(env, types)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


MIXED = ("bf16-mixed", "32-true", "32", 32)  # trainer precisions that keep fp32 master weights under our manual update


def check_precision(cfg: DictConfig) -> None:
    """The optimizer must update fp32 weights: an lr of 1e-6 is below bf16's resolution for typical weights,
    so AdamW on bf16 weights silently does nothing. Compute in bf16 comes from autocast (bf16-mixed)."""
    m = cfg.model
    fix = "model.dtype=float32 trainer.precision=bf16-mixed (fp32 master weights, bf16 compute; model.frozen_dtype=bfloat16 for the frozen copies)"
    if m.dtype not in DTYPES or m.get("frozen_dtype", "float32") not in DTYPES:
        raise ConfigError(f"model.dtype={m.dtype}, model.frozen_dtype={m.get('frozen_dtype')}: choose from {', '.join(DTYPES)}")
    if m.dtype != "float32":
        raise ConfigError(f"model.dtype={m.dtype}: the optimizer would update {m.dtype} weights, below whose resolution "
                          f"a small lr does nothing; use {fix}")
    if cfg.trainer.precision not in MIXED:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision}: true half precision casts the trained weights and "
                          f"16-mixed's loss scaling is not wired into the manual PPO update; use {fix}, or 32-true")
    if m.get("init", "pretrained") not in ("pretrained", "random"):
        raise ConfigError(f"model.init={m.init}: use pretrained (load name_or_path) or random (the `arch` shapes, random weights)")
    if m.get("init") == "random" and m.kind == "tiny":
        raise ConfigError("model.init=random is for the hub architectures (model=qwen3_1.7b or qwen2.5_3b_instruct); "
                          "the tiny policy is always built locally")
    if m.get("init") == "random":
        if m.tokenizer and not os.path.isdir(os.path.expanduser(m.tokenizer)):
            raise ConfigError(f"model.tokenizer={m.tokenizer}: no such folder (a saved tokenizer, e.g. <run dir>/policy); "
                              "null trains one on the run's tasks")
        if not m.tokenizer and m.arch.vocab_size < TASK_VOCAB:
            raise ConfigError(f"model.arch.vocab_size={m.arch.vocab_size}: the task tokenizer may use up to {TASK_VOCAB} "
                              "ids; keep the real vocabulary size (or >= that)")
        arch = OmegaConf.to_container(m.arch)
        try:
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)  # cheap: no weights
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"model.arch: {str(e).split('. ')[0][:200]}") from None
        heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if heads % kv:
            raise ConfigError(f"model.arch: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")


def check_resume(cfg: DictConfig) -> None:
    """`resume` (auto, or a run folder) against `ckpt_path` and the launch (one-line errors)."""
    resume = cfg.get("resume")
    if resume is None:
        return
    if cfg.ckpt_path is not None:
        raise ConfigError(f"resume={resume} and ckpt_path={cfg.ckpt_path}: choose one (resume continues a run in its "
                          "folder; ckpt_path starts a new run from a checkpoint)")
    if sharded(cfg.trainer):
        raise ConfigError("resume with trainer=fsdp: pass ckpt_path=<run dir>/checkpoints/last.ckpt (a sharded folder)")
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("resume in a sweep (-m): rerun the sweep command instead; the study resumes its trials")
    if resume != "auto" and not os.path.isdir(str(resume)):
        raise ConfigError(f"resume={resume}: no such run folder; use resume=auto or an outputs/<task>/runs/<time> folder")


def resume_from(cfg: DictConfig) -> tuple[str | None, int]:
    """The checkpoint this run starts from and its training steps: `ckpt_path`, or with `resume` the last good
    checkpoint of the run folder (Hydra already put this process there, `stepopsd.launch.run_dir`)."""
    if cfg.ckpt_path is not None:
        if sharded(cfg.trainer):
            return cfg.ckpt_path, 0
        steps = steps_done(read_checkpoint(cfg.ckpt_path, mmap=True))  # truncated or not a checkpoint: one line
        check_run_config(cfg, cfg.ckpt_path)
        return cfg.ckpt_path, steps
    if cfg.get("resume") is None:
        return None, 0
    found = last_good_checkpoint(cfg.paths.output_dir)
    if found is None:
        if cfg.resume != "auto":
            raise ConfigError(f"resume={cfg.resume}: no readable checkpoint in {cfg.paths.output_dir}/checkpoints")
        print("[resume=auto] no earlier run of these overrides with a checkpoint: starting a new run", flush=True)
        return None, 0
    path, steps = found
    check_run_config(cfg, path)
    remove_torn(cfg.paths.output_dir)
    dropped = trim_metrics(cfg.paths.output_dir, steps)
    print(f"[resume] continuing {cfg.paths.output_dir} from {os.path.basename(path)} ({steps} training steps done; "
          f"{dropped} metric rows logged after it dropped)", flush=True)
    return path, steps


RUN_IDENTITY = ("algorithm.name", "model.kind", "model.name_or_path", "model.architecture", "model.vocab_size", "model.arch")


def check_run_config(cfg: DictConfig, ckpt_path: str) -> None:
    """The config of the run that wrote a checkpoint (its `.hydra/config.yaml`, next to `checkpoints/`) against this
    one, before any data or policy work: another model or algorithm is a one-line error. (Without that file,
    `check_compatible` compares the weights once the policy is built.)"""
    saved_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), ".hydra", "config.yaml")
    if not os.path.isfile(saved_file):
        return
    saved = OmegaConf.load(saved_file)
    for key in RUN_IDENTITY:
        ours = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        theirs = OmegaConf.select(saved, key, throw_on_resolution_failure=False)
        plain = lambda v: OmegaConf.to_container(v, resolve=False) if OmegaConf.is_config(v) else v
        if plain(ours) != plain(theirs):
            raise CheckpointError(f"{ckpt_path} was written by a run with {key}={plain(theirs)}, this run has "
                                  f"{key}={plain(ours)}: resume with the config the checkpoint's run used ({saved_file})")


def check_model(cfg: DictConfig) -> None:
    """A local model or tokenizer folder is checked before any data or policy work: it exists, its tokenizer
    loads, has an eos token (generation stops at it) and, with model.chat_template=true, a chat template.
    A hub id is left to the loader (it may be cached or downloadable)."""
    m = cfg.model
    if m.kind == "tiny":  # its SFT knobs, before the games and demonstrations are made
        try:
            TinySFTConfig(data="", env=cfg.env.name, corpus="-", **OmegaConf.to_container(m.sft))
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
        return
    folder = m.tokenizer if m.get("init") == "random" else m.name_or_path
    if not folder:
        return
    path = os.path.expanduser(str(folder))
    if not os.path.isdir(path):
        if m.get("init") == "random" or not is_hub_id(str(folder)):
            raise ConfigError(f"model {'tokenizer' if m.get('init') == 'random' else 'name_or_path'}={folder}: no such "
                              "folder (and not a hub id of the form owner/name)")
        return
    tokenizer = load_tokenizer(path)  # PolicyError (one line) when the folder holds no tokenizer
    if tokenizer.eos_token is None:
        raise ConfigError(f"the tokenizer in {folder} has no eos token: set eos_token in its tokenizer_config.json "
                          "(generation stops at it)")
    if m.chat_template and not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer in {folder} has no chat template: add one (chat_template.jinja) or set "
                          "model.chat_template=false to feed plain prompts")


ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


def check_launch(cfg: DictConfig) -> None:
    """Strategy, devices and nodes against how the processes were started (stepopsd/launch.py, experiments/launch/)."""
    t = cfg.trainer
    if str(t.accelerator) not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={t.accelerator}: StepOPSD runs on {', '.join(ACCELERATORS)} "
                          "(machine=cpu for the CPU)")
    gpus = torch.cuda.device_count()
    if str(t.accelerator) in ("gpu", "cuda") and not gpus:
        raise ConfigError(f"trainer.accelerator={t.accelerator} but no CUDA GPU is visible: add machine=cpu, or check "
                          "CUDA_VISIBLE_DEVICES and the driver")
    devices = t.devices
    if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
            or (OmegaConf.is_list(devices) and all(isinstance(d, int) for d in devices))):
        raise ConfigError(f"trainer.devices={devices}: give a count >= 1, a list of device indices, or auto")
    if str(t.accelerator) in ("gpu", "cuda") and isinstance(devices, int) and devices > gpus and launch() is None:
        raise ConfigError(f"trainer.devices={devices} but {gpus} GPU(s) are visible on this node: lower it "
                          "(per node: trainer.num_nodes counts nodes)")
    if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={t.num_nodes}: give the number of nodes (>= 1)")
    strategy = str(t.strategy if isinstance(t.strategy, str) else t.strategy.get("_target_", "")).lower()
    if "fsdp" in strategy:  # Lightning's FSDPStrategy (FSDP1), e.g. trainer.strategy=fsdp
        raise ConfigError(f"trainer.strategy={strategy}: Lightning's FSDPStrategy cannot run GRPOModule's PPO backward "
                          "inside training_step (Lightning issue #19685); use trainer=fsdp (FSDP2 under ModelParallelStrategy)")
    if sharded(t):
        if not isinstance(t.devices, int) or isinstance(t.devices, bool) or t.devices < 1:
            raise ConfigError(f"trainer=fsdp: trainer.devices={t.devices}: give the number of processes per node "
                              "(an integer; the policy is sharded over devices x num_nodes ranks)")
        try:
            ShardingConfig(**OmegaConf.to_container(t.fsdp))
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from e
    if (mismatch := world_size_mismatch(t.devices, t.num_nodes)) is not None:
        raise ConfigError(mismatch)
    if t.num_nodes > 1 and launch() is None:
        raise ConfigError(f"trainer.num_nodes={t.num_nodes}: start the processes of every node with torchrun or SLURM "
                          "srun (experiments/launch/)")
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    many = launch() is not None or t.num_nodes > 1 or (isinstance(t.devices, int) and t.devices > 1)
    if many and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("a Hydra sweep (-m) runs each trial in one process: drop trainer=ddp / devices > 1, "
                          "or launch one multi-GPU job per trial (experiments/launch/README.md)")


def env_spec(cfg: DictConfig) -> EnvSpec:
    """The registered environment `env.name` picks (stepopsd/envs/<name>/spec.py); ConfigError (one line) otherwise."""
    try:
        return get_env(cfg.env.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def env_check(check, *args) -> None:
    """Run one of the environment spec's checks; its ValueError becomes a ConfigError (one line)."""
    try:
        check(*args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_splits(cfg: DictConfig, splits, key: str) -> None:
    """Split names (one-line errors): distinct, and known to the environment (ALFWorld's folders under
    json_2.1.1/; Search-QA's parquet file names are found when loaded)."""
    splits = [splits] if isinstance(splits, str) else list(splits or [])
    if not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"{key}={splits}: name one or more distinct splits")
    env_check(env_spec(cfg).check_splits, splits, key)


def check_objective(cfg: DictConfig, val_tasks: dict[str, list[Task]]) -> str:
    """The logged name of the metric `train` returns (`optimized_metric`), checked against what validation
    will log on these tasks (one-line error otherwise)."""
    tasks = [t for split in val_tasks.values() for t in split]
    prefix, splits, metric = metric_prefix(tasks), list(val_tasks), cfg.env.success_metric
    name = metric_name(cfg.optimized_metric, prefix, splits, metric)
    if (problem := check_metric(name, prefix, splits, metric, sorted({t.task_type for t in tasks}))):
        raise ConfigError(problem)
    return name


