"""The typed config schemas (stepopsd/schemas.py): every default written once, in its dataclass; a misspelt knob or a
wrong type is Hydra's own error; a key added with `+` is refused in one line; a registered estimator brings its schema."""
import dataclasses
import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from helpers.configs import CONF, cfg_of, heat_cpu_cfg
from stepopsd.errors import UserError
from stepopsd.estimators import AlgorithmConfig, Estimator, register_estimator
from stepopsd.schemas import (SchemaError, algorithm_schema, check_schemas, env_schema, register_schemas,
                              schema_node)
from stepopsd.policy.sharding import ShardingConfig
from stepopsd.rollout import RolloutKnobs
from stepopsd.sft import TinySFTKnobs


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def yaml_knobs(path):
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    return dict(leaves(raw))


def schema_of(group: str, name: str):
    return {"algorithm": algorithm_schema, "env": env_schema}[group](name) if group in ("algorithm", "env") \
        else {"rollout": schema_node(RolloutKnobs), "model": schema_node(TinySFTKnobs)}[group]


@pytest.mark.parametrize("group", ["algorithm", "env", "rollout"])
def test_no_config_file_repeats_a_default_of_its_schema(group):
    """Each default is written once, in its dataclass: a group's YAML holds only values that differ from it."""
    folder = os.path.join(CONF, group)
    for file in sorted(os.listdir(folder)):
        name = file[:-5]
        schema = dict(leaves(OmegaConf.to_container(schema_of(group, name if group != "rollout" else ""), resolve=False)))
        for key, value in yaml_knobs(os.path.join(folder, file)).items():
            assert key in schema, f"conf/{group}/{file}: {key} is not a knob of its schema"
            assert value != schema[key], f"conf/{group}/{file}: {key}={value} repeats the schema's default"


def test_the_tiny_models_sft_knobs_differ_from_their_defaults():
    sft = yaml_knobs(os.path.join(CONF, "model", "tiny.yaml"))
    defaults = {f.name: f.default for f in dataclasses.fields(TinySFTKnobs)}
    assert {k: v for k, v in sft.items() if k.startswith("sft.")} and all(
        v != defaults[k[4:]] for k, v in sft.items() if k.startswith("sft."))


def test_composed_nodes_carry_the_dataclass_defaults():
    cfg = cfg_of("experiment=alfworld_heat", "trainer=fsdp")
    assert cfg.algorithm.ppo.lr == 1e-6 and cfg.algorithm.ppo.micro_batch_rows == 8  # a run's micro-batch
    assert cfg.algorithm.ppo.temperature == cfg.rollout.temperature == 1.0  # one knob
    assert cfg.algorithm.stepopsd.target_span == "action_only" and cfg.algorithm.stepopsd.peer_budget_tokens == 512
    assert cfg.rollout.vllm.dtype == "auto" and cfg.rollout.vllm.max_model_len is None
    assert OmegaConf.to_container(cfg.trainer.fsdp) == dataclasses.asdict(ShardingConfig())
    qa = cfg_of("experiment=searchqa", "algorithm=grpo")  # the protocol's target span for every algorithm
    assert (qa.env.target_span, qa.env.max_steps, qa.env.success_metric) == ("clean_step_no_observation", 4, "em")
    assert cfg_of("experiment=searchqa").algorithm.stepopsd.peer_budget_tokens == 1024


@pytest.mark.parametrize("override, expected", [
    ("algorithm.ppo.lr=fast", "could not be converted to Float"),
    ("env.max_steps=many", "could not be converted to Integer"),
    ("rollout.vllm.enable_prefix_caching=maybe", "is not a valid bool"),
    ("model.sft.epochs=ten", "could not be converted to Integer"),
    ("algorithm.stepopsd.alpha=0.1", "Could not override 'algorithm.stepopsd.alpha'"),
    ("rollout.vlm.dtype=auto", "Could not override 'rollout.vlm.dtype'"),
])
def test_a_wrong_type_or_misspelt_knob_is_hydras_own_error(override, expected):
    with pytest.raises(ConfigCompositionException) as e:
        heat_cpu_cfg(override)
    assert expected in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, expected", [
    ("+algorithm.ppo.lrr=1", "algorithm.ppo.lrr: Key 'lrr' not in 'PPOConfig'; the knobs there: lr, warmup_steps,"),
    ("+algorithm.stepopsd.lam=1", "algorithm.stepopsd.lam: Key 'lam' not in 'StepOPSDConfig'; the knobs there: alpha_clip,"),
    ("+algorithm.gamma=0.9", "algorithm.gamma: Key 'gamma' not in 'StepOPSDAlgorithm'; the knobs there: name, ppo,"),
    ("+rollout.vllm.quantization=fp8", "rollout.vllm.quantization: Key 'quantization' not in 'VLLMConfig'"),
    ("+env.retriever.url=x", "env.retriever: Key 'retriever' not in 'AlfWorldConfig'"),
    ("+model.sft.epoch=3", "model.sft.epoch: Key 'epoch' not in 'TinySFTKnobs'; the knobs there: epochs, lr,"),
])
def test_a_key_added_with_plus_is_refused_in_one_line(override, expected):
    cfg = heat_cpu_cfg(override)  # `+` passes Hydra's composition
    with pytest.raises(SchemaError) as e:
        check_schemas(cfg)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value) and expected in str(e.value), str(e.value)


def test_a_key_added_to_the_sharding_knobs_is_refused():
    cfg = cfg_of("experiment=alfworld_heat", "trainer=fsdp", "+trainer.fsdp.cpu_offload=true")
    with pytest.raises(SchemaError, match="trainer.fsdp.cpu_offload: Key 'cpu_offload' not in 'ShardingConfig'"):
        check_schemas(cfg)
    check_schemas(cfg_of("experiment=alfworld_heat", "trainer=fsdp"))  # the shipped configs fit


def test_a_registered_estimator_brings_its_schema():
    @dataclasses.dataclass
    class KnobbedConfig(AlgorithmConfig):
        gamma: float = 0.95

    @register_estimator("test_knobbed")
    class Knobbed(Estimator):
        config = KnobbedConfig

    register_schemas()
    node = algorithm_schema("test_knobbed")
    assert (node.name, node.gamma, node.ppo.micro_batch_rows, node.teacher.micro_batch_rows) == ("test_knobbed", 0.95, 8, 8)
    cfg = heat_cpu_cfg("algorithm=rloo", "algorithm.name=test_knobbed", "+algorithm.gamma=0.9")
    check_schemas(cfg)  # gamma is its knob
    with pytest.raises(SchemaError, match="algorithm.gama: Key 'gama' not in 'KnobbedConfig'"):
        check_schemas(heat_cpu_cfg("algorithm=rloo", "algorithm.name=test_knobbed",
                                   "+algorithm.gama=0.9"))
