"""The credit probe: python probe.py experiment=credit_early machine=cpu [eval.policy=DIR] [probe.steps=32] ..."""
import hydra
from omegaconf import DictConfig

import stepopsd.launch  # noqa: F401  registers the resolvers conf/hydra/default.yaml uses (as train.py and eval.py)
import stepopsd.schemas  # noqa: F401  the typed schemas conf/ composes on (stepopsd/schemas.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from stepopsd.errors import main_guard
    from stepopsd.evaluate import probe_policy

    with main_guard("probe.py"):  # a user error: one line (stepopsd/errors.py)
        probe_policy(cfg)


if __name__ == "__main__":
    from stepopsd.errors import hydra_entry

    hydra_entry(main, "probe.py")
