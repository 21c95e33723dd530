"""Evaluate: python eval.py experiment=alfworld_heat [machine=cpu] [eval.policy=DIR] [eval.split=valid_unseen]"""
import sys

import hydra
from omegaconf import DictConfig

import stepopsd.launch  # noqa: F401  registers the resolvers conf/hydra/default.yaml uses (as train.py and sft.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from stepopsd.evaluate import evaluate
    from stepopsd.train import ConfigError

    try:
        return evaluate(cfg)[cfg.env.success_metric]
    except (ConfigError, FileNotFoundError) as e:  # bad knobs, missing data: one line, before any work
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
