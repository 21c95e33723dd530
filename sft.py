"""Build (or find in the cache) the SFT-warm-started tiny policy: python sft.py [machine=cpu] [model.sft.epochs=...]"""
import hydra
from omegaconf import DictConfig

import stepopsd.launch  # noqa: F401  registers ${stepopsd.run_stamp:...} (conf/hydra/default.yaml)
import stepopsd.schemas  # noqa: F401  the typed schemas conf/ composes on (stepopsd/schemas.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from stepopsd.errors import UserError, main_guard
    from stepopsd.build import build_policy, prepare_data

    with main_guard("sft.py"):  # a user error: one line (stepopsd/errors.py)
        if cfg.model.kind != "tiny":
            raise UserError("sft.py builds the tiny offline policy: add machine=cpu (or model=tiny)")
        build_policy(cfg, prepare_data(cfg))


if __name__ == "__main__":
    from stepopsd.errors import hydra_entry

    hydra_entry(main, "sft.py")
