"""One ALFWorld experiment, the task type its parameter: `experiment=alfworld task_type=<type>` is the named
overlay `experiment=alfworld_<type>` (and, with the 3B model, `alfworld_<type>_3b`) value for value."""
import pytest
import yaml
from omegaconf import OmegaConf

from stepopsd.config import ConfigError, check_config

from helpers.configs import cfg_of

TASK_TYPES = ["heat", "pick", "look", "clean", "cool", "pick_two", "all"]
RUNTIME = ("logger", "paths")  # their interpolations need Hydra's runtime (the run directory): compared as written


def values(cfg) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=k not in RUNTIME) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg}


@pytest.mark.parametrize("task", TASK_TYPES)
@pytest.mark.parametrize("machine", [[], ["machine=cpu"]])
def test_the_parameter_is_the_named_overlay(task, machine):
    named = values(cfg_of(f"experiment=alfworld_{task}", *machine))
    assert values(cfg_of("experiment=alfworld", f"task_type={task}", *machine)) == named
    assert named["task_name"] == f"alfworld_{task}" and named["data"]["task_types"] == [task]


@pytest.mark.parametrize("task", TASK_TYPES)
@pytest.mark.parametrize("machine", [[], ["machine=cpu"]])
def test_the_3b_overlay_is_the_parameter_with_the_3b_model(task, machine):
    # machine=cpu puts the tiny policy in place of the experiment's model; a model= typed on the command line
    # would win over it (as on any experiment), so the CPU equivalent leaves it out
    model = [] if machine else ["model=qwen2.5_3b_instruct"]
    named = values(cfg_of(f"experiment=alfworld_{task}_3b", *machine))
    assert values(cfg_of("experiment=alfworld", f"task_type={task}", *model, f"task_name=alfworld_{task}_3b",
                         *machine)) == named


@pytest.mark.parametrize("experiment", ["alfworld_heat", "alfworld_heat_3b"])
def test_an_algorithm_on_top_is_the_same_either_way(experiment):
    big = experiment.endswith("_3b")
    for extra in (["algorithm=grpo"], ["algorithm=grpo", "machine=cpu"]):
        param = (["task_name=alfworld_heat_3b"] + ([] if "machine=cpu" in extra else ["model=qwen2.5_3b_instruct"])
                 if big else [])
        assert values(cfg_of("experiment=alfworld", "task_type=heat", *param, *extra)) == \
            values(cfg_of(f"experiment={experiment}", *extra))


def test_without_a_task_type_it_is_every_type():
    assert values(cfg_of("experiment=alfworld")) == values(cfg_of("experiment=alfworld_all"))


def test_a_named_overlay_follows_a_task_type_given_on_top_of_it():
    assert values(cfg_of("experiment=alfworld_heat", "task_type=cool")) == values(cfg_of("experiment=alfworld_cool"))
    assert cfg_of("experiment=alfworld_heat_3b", "task_type=cool").task_name == "alfworld_cool_3b"


def test_analysis_reads_the_task_type_of_a_saved_unresolved_config(tmp_path):
    # Hydra saves .hydra/config.yaml unresolved (`task_types: ['${task_type}']`); run_info resolves what it reads
    from stepopsd.analysis import run_info

    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    cfg = cfg_of("experiment=alfworld_pick_two", "machine=cpu")
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert yaml.safe_load((hydra_dir / "config.yaml").read_text())["data"]["task_types"] == ["${task_type}"]
    (hydra_dir / "overrides.yaml").write_text("- experiment=alfworld_pick_two\n")
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"experiment": "alfworld_pick_two",
                                                                                          "env": "alfworld"}}}}))
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("train_step,val_generated/valid_seen/success\n")
    info = run_info(str(tmp_path))
    assert info["task_types"] == "pick_two" and info["experiment"] == "alfworld_pick_two" and info["data"] == "generated"


def test_an_unknown_task_type_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown ALFWorld task type") as e:
        check_config(cfg_of("experiment=alfworld", "task_type=hot", "machine=cpu"))
    assert "\n" not in str(e.value) and "'hot'" in str(e.value)
