"""Composed Hydra configs of conf/ (no checks run): `cfg_of` as given, `heat_cpu_cfg` on alfworld_heat, machine=cpu."""
import os

from hydra import compose, initialize_config_dir

from helpers.runs import ROOT

CONF = os.path.join(ROOT, "conf")


def cfg_of(*overrides, name="train"):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(name, overrides=list(overrides), return_hydra_config=False)


def heat_cpu_cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("train", overrides=["experiment=alfworld_heat", "machine=cpu", *overrides])
