"""Environments: each package here (alfworld/, search/) holds one, and registers its `EnvSpec` in its `spec.py`
(stepopsd/envs/registry.py). slots.py and workers.py are what the environments share."""
from stepopsd.envs.registry import EnvSpec, UnknownEnvError, env_names, get_env, register_env

__all__ = ["EnvSpec", "UnknownEnvError", "env_names", "get_env", "register_env"]
