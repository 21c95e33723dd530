"""Evaluate: python eval.py experiment=alfworld_heat [machine=cpu] [eval.policy=DIR] [eval.split=valid_unseen]"""
import hydra
from omegaconf import DictConfig

import stepopsd.launch  # noqa: F401  registers the resolvers conf/hydra/default.yaml uses (as train.py and sft.py)
import stepopsd.schemas  # noqa: F401  the typed schemas conf/ composes on (stepopsd/schemas.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from stepopsd.evaluate import evaluate
    from stepopsd.errors import main_guard

    with main_guard("eval.py"):  # a user error: one line (stepopsd/errors.py)
        return evaluate(cfg)[cfg.env.success_metric]


if __name__ == "__main__":
    from stepopsd.errors import hydra_entry

    hydra_entry(main, "eval.py")
