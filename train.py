"""Train: python train.py experiment=alfworld_heat [machine=cpu] [algorithm=grpo|stepopsd] [key=value ...]"""
import sys

import hydra
from omegaconf import DictConfig

import stepopsd.launch  # noqa: F401  registers ${stepopsd.run_stamp:...}, the run directory every rank shares


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from stepopsd.launch import LaunchError
    from stepopsd.module import LogpGapError
    from stepopsd.train import ConfigError, train

    try:
        return train(cfg)
    except (ConfigError, FileNotFoundError, LaunchError, LogpGapError) as e:  # bad knobs, missing data, rank 0
        # failed, a rollout engine out of step with the trainer: one line
        if cfg.trial.number is not None:
            raise  # an Optuna sweep's trial: the sweeper records it and stops the sweep with this line
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
