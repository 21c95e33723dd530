"""One PPO update through Lightning on a ready batch (`fit_one_batch`), the knobs the update tests share (`PPO`),
weight comparison (`params_equal`), a teacher that must never run (`Boom`), and the advantage stage with a StepOPSD
estimator over GRPO (`stepopsd_stage`)."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from stepopsd.callbacks.advantages import AdvantageStage
from stepopsd.estimators import Services, build_estimator
from stepopsd.module import GRPOModule, PPOConfig

PPO = dict(kl_coef=0.0, entropy_coef=0.0, lr=1e-3, max_grad_norm=1.0)


class Boom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher must not run when lambda = 0")


def params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def fit_one_batch(policy, batch, ppo: PPOConfig, callbacks=()):
    """One training step of a GRPOModule on `batch` with a 1-device CPU Trainer; returns the trainer."""
    module = GRPOModule(policy, ppo)
    loader = DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_steps=1, limit_train_batches=1, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def stepopsd_stage(tok, **knobs) -> AdvantageStage:
    """The advantage stage with StepOPSD over GRPO (the spec's defaults, `knobs` overriding), as algorithm=stepopsd
    builds it."""
    from dataclasses import asdict

    from stepopsd.algorithms.stepopsd import StepOPSDConfig

    algorithm = {"name": "stepopsd", "base": "grpo", "stepopsd": asdict(StepOPSDConfig(**knobs))}
    return AdvantageStage(build_estimator(algorithm), Services(tokenizer=tok))
