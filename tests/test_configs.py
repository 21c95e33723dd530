"""Every experiment config composes with every group, holds its protocol, and passes the knob checks."""
import os
import sys

import pytest
from omegaconf import OmegaConf

from stepopsd.config import ConfigError, check_config, env_spec
from stepopsd.estimators import get_estimator

from helpers.configs import CONF, cfg_of

EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")))
ALGORITHMS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "algorithm")))  # one per registered estimator


def test_the_experiments_the_issue_names_exist():
    assert set(EXPERIMENTS) >= {"alfworld_heat", "alfworld_pick", "alfworld_look", "alfworld_clean", "alfworld_cool",
                                "alfworld_pick_two", "alfworld_all", "searchqa", "searchqa_triviaqa", "searchqa_hotpotqa"}
    assert {f"alfworld_{t}_3b" for t in ("heat", "pick", "look", "clean", "cool", "pick_two", "all")} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("machine", [None, "cpu"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_every_experiment_composes_and_its_knobs_check(experiment, machine, algorithm, entry):
    overrides = [f"experiment={experiment}", f"algorithm={algorithm}"] + ([f"machine={machine}"] if machine else [])
    cfg = cfg_of(*overrides, name=entry)
    for group in ("env", "data", "model", "algorithm", "rollout", "trainer", "logger", "callbacks", "paths"):
        assert group in cfg, group
        if group not in ("logger", "paths"):  # those need Hydra's runtime (the run directory)
            OmegaConf.to_container(cfg[group], resolve=True)  # every interpolation resolves
    if machine == "cpu" and getattr(get_estimator(algorithm), "needs_exact_credit", False) \
            and env_spec(cfg).exact_credit(cfg) is None:  # the oracle outside the credit env: one line
        with pytest.raises(ConfigError, match=f"algorithm={algorithm} needs each step's exact credit"):
            check_config(cfg)
    elif machine == "cpu":
        ppo, estimator, rollout_cfg = check_config(cfg)
        assert cfg.model.kind == "tiny" and cfg.data.generate is not None and not cfg.require_gpu
        assert estimator.name == algorithm  # algorithm=<name> picks the registered estimator of that name
        assert not cfg.env.require_think and rollout_cfg.chat_template_kwargs == {}
        assert len(cfg.data.val_splits) == 1  # one validation split on the CPU machine (its cost unchanged)
    else:
        model = "Qwen/Qwen2.5-3B-Instruct" if experiment.endswith("_3b") else "Qwen/Qwen3-1.7B"
        assert cfg.require_gpu and cfg.model.name_or_path == model and cfg.env.require_think
        assert cfg.training_steps == 150 and cfg.algorithm.ppo.lr == 1e-6
        # fp32 master weights, bf16 compute, bf16 frozen copies, micro-batches inside the 256-row mini-batch
        assert (cfg.model.dtype, cfg.model.frozen_dtype, cfg.trainer.precision) == ("float32", "bfloat16", "bf16-mixed")
        assert cfg.algorithm.ppo.mini_batch_rows == 256 and 0 < cfg.algorithm.ppo.micro_batch_rows < 256
        assert cfg.model.gradient_checkpointing and cfg.model.init == "pretrained"
        assert cfg.val_tasks == 500 if experiment.startswith("searchqa") else cfg.val_tasks is None
        if entry == "eval":
            assert cfg.eval.split == cfg.data.val_splits[0]


def test_paper_protocols():
    heat = cfg_of("experiment=alfworld_heat")
    assert (heat.tasks_per_step, heat.group_size, heat.env.max_steps, heat.env.history_length) == (16, 8, 50, 2)
    assert list(heat.data.task_types) == ["heat"] and heat.algorithm.ppo.kl_coef == 0.01
    qa = cfg_of("experiment=searchqa")
    assert (qa.tasks_per_step, qa.group_size, qa.env.max_steps, qa.env.history_length, qa.env.topk) == (128, 8, 4, 4, 3)
    assert qa.env.invalid_penalty == 0.01 and qa.algorithm.ppo.kl_coef == 0.001 and qa.algorithm.ppo.warmup_steps == 15
    assert qa.algorithm.stepopsd.target_span == "clean_step_no_observation"
    assert list(qa.data.task_types) == ["nq", "hotpotqa"] and list(qa.data.val_task_types) == ["all"]
    trivia = cfg_of("experiment=searchqa_triviaqa")
    assert (trivia.algorithm.stepopsd.lam0, trivia.algorithm.stepopsd.alpha_clip) == (0.05, 0.05)
    assert cfg_of("experiment=searchqa_hotpotqa").algorithm.stepopsd.lam0 == 0.2
    # machine=cpu picks the environment's own overlay
    assert cfg_of("experiment=searchqa", "machine=cpu").env.max_steps == 4
    assert cfg_of("experiment=alfworld_heat", "machine=cpu").env.max_steps == 20
    # the ALFWorld overlay adds the KL anchor on top of machine=cpu's PPO settings (merged, not replaced)
    heat_cpu, qa_cpu = cfg_of("experiment=alfworld_heat", "machine=cpu"), cfg_of("experiment=searchqa", "machine=cpu")
    assert heat_cpu.algorithm.ppo.kl_coef == 0.05 and heat_cpu.algorithm.ppo.lr == qa_cpu.algorithm.ppo.lr == 5e-4
    assert qa_cpu.algorithm.ppo.kl_coef == 0.0 and heat_cpu.training_steps == 20 and qa_cpu.training_steps == 10


@pytest.mark.parametrize("override, words", [
    ("algorithm.stepopsd.alpha_clip=0", "alpha_clip"), ("algorithm.stepopsd.lam0=1.5", "lam"),
    ("group_size=1", "group_size"), ("algorithm.ppo.clip_low=1.2", "clip_low"), ("rollout.max_new_tokens=0", "max_new_tokens"),
    ("algorithm.stepopsd.target_span=whole", "target_span"), ("callbacks.checkpoint_every=-1", "checkpoint_every"),
    ("env.max_steps=0", "max_steps"), ("model.dtype=bfloat16", "model.dtype=bfloat16: the optimizer"),
    ("trainer.precision=bf16-true", "trainer.precision=bf16-true"), ("trainer.precision=16-mixed", "16-mixed"),
    ("model.frozen_dtype=int8", "frozen_dtype"), ("+model.init=random", "model.init=random is for the hub"),
    ("algorithm.ppo.micro_batch_rows=65", "micro_batch_rows=65"), ("algorithm.ppo.micro_batch_tokens=-5", "micro_batch_tokens"),
    ("algorithm.teacher.micro_batch_rows=0", "teacher.micro_batch_rows"),
    ("algorithm.ppo.rollout_is_cap=0.5", "rollout_is_cap=0.5"), ("rollout.backend=sglang", "rollout.backend=sglang")])
def test_bad_knobs_are_one_line_config_errors(override, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", override))
    assert "\n" not in str(e.value)


def test_vllm_backend_checks_before_any_work(monkeypatch):
    """rollout.backend=vllm: filtered sampling is refused (vLLM's log-probs would be of the filtered distribution),
    and without vLLM installed the error is one line naming the extra."""
    for override, words in [("rollout.top_p=0.9", "top_p=0.9, top_k=0"), ("rollout.vllm.sleep_level=3", "sleep_level=3"),
                            ("rollout.vllm.gpu_memory_utilization=1.5", "gpu_memory_utilization"),
                            ("rollout.vllm.max_model_len=100", "max_model_len=100 <")]:
        with pytest.raises(ConfigError, match=words) as e:
            check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", "rollout.backend=vllm", override))
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    with pytest.raises(ConfigError, match=r"needs vLLM: pip install -e '\.\[vllm\]'") as e:
        check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", "rollout.backend=vllm"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["env.topk=0"], "topk"), (["env.retriever.start_server=false", "env.retriever.url=null"], "retriever.url")])
def test_bad_search_knobs_are_one_line_config_errors(overrides, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg_of("experiment=searchqa", "machine=cpu", *overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("task", ["heat", "pick", "look", "clean", "cool", "pick_two", "all"])
def test_3b_experiments_are_the_paper_protocol_with_qwen25_3b(task):
    base, big = cfg_of(f"experiment=alfworld_{task}"), cfg_of(f"experiment=alfworld_{task}_3b")
    assert big.model.name_or_path == "Qwen/Qwen2.5-3B-Instruct" and big.task_name == f"alfworld_{task}_3b"
    differ = {k for k in base if k not in ("model", "task_name") and base[k] != big[k]}
    assert not differ, differ  # everything else is the 1.7B experiment's
    assert cfg_of(f"experiment=alfworld_{task}_3b", "machine=cpu").model.kind == "tiny"


@pytest.mark.parametrize("model, think, kwargs", [
    ("qwen3_1.7b", True, {"enable_thinking": False}), ("qwen2.5_3b_instruct", True, {}), ("tiny", False, {})])
@pytest.mark.parametrize("experiment", ["alfworld_heat", "searchqa"])
def test_require_think_and_template_arguments_follow_the_model(model, think, kwargs, experiment):
    cfg = cfg_of(f"experiment={experiment}", f"model={model}")
    assert cfg.env.require_think is think and dict(cfg.model.chat_template_kwargs) == kwargs
    cfg = cfg_of(f"experiment={experiment}", f"model={model}", "require_gpu=false")
    assert check_config(cfg)[2].chat_template_kwargs == kwargs  # what rollouts, validation and eval.py use


def test_validation_splits():
    heat, qa = cfg_of("experiment=alfworld_heat"), cfg_of("experiment=searchqa")
    assert list(heat.data.val_splits) == ["valid_seen", "valid_unseen"] and heat.val_tasks is None  # every game
    assert list(qa.data.val_splits) == ["test"]
    assert list(cfg_of("experiment=alfworld_heat", "machine=cpu").data.val_splits) == ["valid_seen"]
    assert cfg_of("experiment=alfworld_heat", "machine=cpu").val_tasks == 16


@pytest.mark.parametrize("override, words", [
    ("data.val_splits=[valid_seen,valid_unsen]", "valid_unsen"), ("data.val_splits=[]", "val_splits"),
    ("data.val_splits=[valid_seen,valid_seen]", "val_splits"), ("val_tasks=0", "val_tasks")])
def test_bad_validation_knobs_are_one_line_config_errors(override, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", override))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, words", [("model.arch.model_type=nope", "model.arch: Unrecognized"),
                                             ("model.arch.num_key_value_heads=3", "not a multiple"),
                                             ("model.arch.vocab_size=512", "model.arch.vocab_size=512"),
                                             ("model.tokenizer=/no/such/tok", "model.tokenizer=/no/such/tok: no such folder")])
def test_bad_random_init_architecture_is_a_one_line_error(override, words):
    cfg = cfg_of("experiment=alfworld_heat", "machine=cpu", "model=qwen3_1.7b", "model.init=random", override)
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg)
    assert "\n" not in str(e.value)
