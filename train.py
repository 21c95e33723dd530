"""Train: python train.py experiment=alfworld_heat [machine=cpu] [algorithm=grpo|stepopsd] [key=value ...]"""
import hydra
from omegaconf import DictConfig

import stepopsd.launch  # noqa: F401  registers ${stepopsd.run_stamp:...}, the run directory every rank shares
import stepopsd.schemas  # noqa: F401  the typed schemas conf/ composes on (stepopsd/schemas.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from stepopsd.errors import main_guard
    from stepopsd.train import train

    # A user error (bad knob, data, model, checkpoint, service) is one line; in an Optuna trial the sweeper
    # records it and stops the sweep with that line (stepopsd/errors.py).
    with main_guard("train.py", reraise=cfg.trial.number is not None):
        return train(cfg)


if __name__ == "__main__":
    from stepopsd.errors import hydra_entry

    hydra_entry(main, "train.py")
