"""Typed config schemas: every knob's type and its one default live in a dataclass beside the code that reads it,
and Hydra composes conf/ on top of them. A YAML file under conf/ holds only what differs from those defaults.

    node                      schema (dataclass)                                   stored as
    algorithm                 the estimator's `config` (stepopsd/estimators/):      schema/algorithm/<name>
                              AlgorithmConfig (ppo: PPOConfig, teacher) + its knobs
    rollout                   stepopsd.rollout.RolloutKnobs (vllm: VLLMConfig)     schema/rollout
    env                       the environment's `config` (stepopsd/envs/<name>/)   schema/env/<name>
    trainer.fsdp              stepopsd.policy.sharding.ShardingConfig              schema/sharding
    model.sft (tiny policy)   stepopsd.sft.TinySFTKnobs                            schema/tiny_sft
    probe                     stepopsd.probe.ProbeConfig (the credit probe)        schema/probe

A YAML file takes its schema in its defaults list (`- /schema/algorithm@_here_: grpo`), so a misspelt knob
(`algorithm.ppo.l=1`) or a wrong type (`algorithm.ppo.lr=fast`) is Hydra's own composition error, printed as one line
(`stepopsd.errors.hydra_entry`). A key added with `+` passes composition; `check_schemas` merges each node onto its
schema again and refuses it (one line). A registered estimator or environment brings its schema with it: nothing to
add here.

`register_schemas()` runs on import of this module; the entry points (train.py, eval.py, sft.py) and every
`compose` import it first.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepopsd.envs.registry import env_names, get_env
from stepopsd.errors import UserError
from stepopsd.estimators import estimator_names, get_estimator
from stepopsd.policy.sharding import ShardingConfig
from stepopsd.probe import ProbeConfig
from stepopsd.rollout import RolloutKnobs
from stepopsd.sft import TinySFTKnobs


class SchemaError(UserError, ValueError):
    """A config node that does not fit its schema (a key added with `+` that no dataclass has)."""


def schema_node(schema) -> DictConfig:
    """A dataclass (class or instance) as an OmegaConf node Hydra can merge YAML into: typed, with its defaults, and
    writable (OmegaConf makes a frozen dataclass's node read-only; our frozen dataclasses are only frozen at run time)."""
    node = OmegaConf.structured(schema)

    def writable(n) -> None:
        n._set_flag("readonly", None)
        if OmegaConf.is_dict(n):
            for key in n:
                writable(n._get_node(key))
    writable(node)
    return node


def algorithm_schema(name: str) -> DictConfig:
    node = schema_node(get_estimator(name).config(name=name))
    node.ppo.temperature = "${rollout.temperature}"  # log-probs are taken at the sampling temperature: one knob
    return node


def env_schema(name: str) -> DictConfig:
    return schema_node(get_env(name).config(name=name))


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (group `schema`), for the defaults lists of conf/."""
    store = ConfigStore.instance()
    for name in estimator_names():
        store.store(group="schema/algorithm", name=name, node=algorithm_schema(name))
    for name in env_names():
        store.store(group="schema/env", name=name, node=env_schema(name))
    store.store(group="schema", name="rollout", node=schema_node(RolloutKnobs))
    store.store(group="schema", name="sharding", node=schema_node(ShardingConfig))
    store.store(group="schema", name="tiny_sft", node=schema_node(TinySFTKnobs))
    store.store(group="schema", name="probe", node=schema_node(ProbeConfig))


def bound_schemas(cfg: DictConfig) -> dict[str, DictConfig]:
    """The schema each schema'd node of a composed run config must fit, by its key (an unregistered algorithm or
    environment name is left to its own check: one line listing the registered ones)."""
    out = {"rollout": schema_node(RolloutKnobs), "probe": schema_node(ProbeConfig)}
    if cfg.algorithm.name in estimator_names():
        out["algorithm"] = algorithm_schema(cfg.algorithm.name)
    if cfg.env.name in env_names():
        out["env"] = env_schema(cfg.env.name)
    if OmegaConf.select(cfg, "trainer.fsdp") is not None:
        out["trainer.fsdp"] = schema_node(ShardingConfig)
    if cfg.model.get("kind") == "tiny":
        out["model.sft"] = schema_node(TinySFTKnobs)
    return out


def check_schemas(cfg: DictConfig) -> None:
    """Each schema'd node merged onto its schema again: a key added with `+` that the schema lacks, or a value of
    the wrong type, is a `SchemaError` (one line) naming the key and the knobs the node has."""
    for key, schema in bound_schemas(cfg).items():
        try:
            OmegaConf.merge(schema, OmegaConf.to_container(OmegaConf.select(cfg, key)))  # plain: `+` keys stand out
        except OmegaConfBaseException as e:
            where = ".".join(filter(None, (key, str(getattr(e, "full_key", "") or ""))))
            raise SchemaError(f"{where}: {str(e).splitlines()[0]}; the knobs there: {', '.join(knobs_at(schema, e))}") \
                from None


def knobs_at(schema: DictConfig, error: OmegaConfBaseException) -> list[str]:
    """The knob names of the node an OmegaConf error points at (its `full_key`, below the schema's root)."""
    node = schema
    for part in str(getattr(error, "full_key", "") or "").split(".")[:-1]:
        if not (OmegaConf.is_dict(node) and part in node):
            break
        node = node[part]
    return [str(k) for k in (node if OmegaConf.is_dict(node) else schema)]


register_schemas()
