"""Every experiment config composes with every group, holds its protocol, and passes the knob checks."""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stepopsd.train import ConfigError, check_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")))


def cfg_of(*overrides, name="train"):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(name, overrides=list(overrides), return_hydra_config=False)


def test_the_experiments_the_issue_names_exist():
    assert set(EXPERIMENTS) >= {"alfworld_heat", "alfworld_pick", "alfworld_look", "alfworld_clean", "alfworld_cool",
                                "alfworld_pick_two", "alfworld_all", "searchqa", "searchqa_triviaqa", "searchqa_hotpotqa"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("machine", [None, "cpu"])
@pytest.mark.parametrize("algorithm", ["grpo", "stepopsd"])
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_every_experiment_composes_and_its_knobs_check(experiment, machine, algorithm, entry):
    overrides = [f"experiment={experiment}", f"algorithm={algorithm}"] + ([f"machine={machine}"] if machine else [])
    cfg = cfg_of(*overrides, name=entry)
    for group in ("env", "data", "model", "algorithm", "rollout", "trainer", "logger", "callbacks", "paths"):
        assert group in cfg, group
        if group not in ("logger", "paths"):  # those need Hydra's runtime (the run directory)
            OmegaConf.to_container(cfg[group], resolve=True)  # every interpolation resolves
    if machine == "cpu":
        ppo, method, rollout_cfg = check_config(cfg)
        assert cfg.model.kind == "tiny" and cfg.data.generate is not None and not cfg.require_gpu
        assert (method is None) == (algorithm == "grpo")
    else:
        assert cfg.require_gpu and cfg.model.name_or_path == "Qwen/Qwen3-1.7B"
        assert cfg.training_steps == 150 and cfg.algorithm.ppo.lr == 1e-6


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
    ("env.max_steps=0", "max_steps")])
def test_bad_knobs_are_one_line_config_errors(override, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", override))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["env.topk=0"], "topk"), (["env.retriever.start_server=false", "env.retriever.url=null"], "retriever.url")])
def test_bad_search_knobs_are_one_line_config_errors(overrides, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_config(cfg_of("experiment=searchqa", "machine=cpu", *overrides))
    assert "\n" not in str(e.value)
