"""The advantage-estimator registry (stepopsd/estimators): one interface, picked by `algorithm=<name>`.

Numbers computed by hand on a four-trajectory batch: group 0 rewards (10, 0), group 1 rewards (0, 0).
  GRPO (Eq. 1): group 0 mean 5, unbiased std sqrt(25 + 25) = 7.0711 -> A = +-5 / 7.0711 = +-0.70711; group 1: 0.
  Dr.GRPO: the centring alone, +-5 and 0.
StepOPSD composes over a base estimator: with lambda = 0 it returns the base's advantages exactly, whichever base.
"""
import os
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from stepopsd.callbacks.advantages import AdvantageStage
from stepopsd.checkpoints import checkpoint_estimator
from stepopsd.estimators import (Context, Estimator, Services, UnknownEstimatorError, build_estimator, estimator_names,
                                 register_estimator)
from stepopsd.config import ConfigError, check_config

from helpers.batches import batch_of

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
BATCH = batch_of([10.0, 0.0, 0.0, 0.0], [0, 0, 1, 1])


def test_the_shipped_estimators_are_registered_and_an_unknown_name_is_one_line():
    assert {"grpo", "drgrpo", "stepopsd"} <= set(estimator_names())
    with pytest.raises(UnknownEstimatorError, match=r"algorithm=ppo2: no advantage estimator of that name; registered: "
                                                    r"drgrpo, .*grpo, .*stepopsd"):
        build_estimator({"name": "ppo2"})
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("train", overrides=["experiment=alfworld_heat", "machine=cpu", "algorithm.name=ppo2"])
    with pytest.raises(ConfigError, match="algorithm=ppo2: no advantage estimator") as e:
        check_config(cfg)
    assert "\n" not in str(e.value)


def test_a_registered_estimator_is_found_by_name():
    @register_estimator("test_constant")
    class Constant(Estimator):
        def advantages(self, batch, ctx):
            from stepopsd.estimators import Advantages
            return Advantages(batch.loss_mask * 3.0)

    assert "test_constant" in estimator_names()
    est = build_estimator({"name": "test_constant"})
    assert est.name == "test_constant" and torch.equal(est.advantages(BATCH, Context(step=0)).tokens, BATCH.loss_mask * 3)
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("grpo")(Constant)


def test_grpo_and_drgrpo_by_hand():
    a = 5 / (50 ** 0.5)
    out = build_estimator({"name": "grpo", "scale_by_std": True}).advantages(BATCH, Context(step=0))
    torch.testing.assert_close(out.trajectories, torch.tensor([a, -a, 0.0, 0.0]), atol=1e-5, rtol=0)
    expect = torch.tensor([a, a, -a, 0, 0, 0, 0])[:, None] * BATCH.loss_mask  # rows 0-1: trajectory 0, row 2: 1, ...
    torch.testing.assert_close(out.tokens, expect, atol=1e-5, rtol=0)
    dr = build_estimator({"name": "drgrpo", "scale_by_std": True}).advantages(BATCH, Context(step=0))
    assert dr.trajectories.tolist() == [5.0, -5.0, 0.0, 0.0]  # Dr.GRPO ignores scale_by_std: never divides by std
    assert build_estimator({"name": "grpo", "scale_by_std": False}).advantages(BATCH, Context(step=0)).trajectories.tolist() \
        == [5.0, -5.0, 0.0, 0.0]


STEPOPSD = {"alpha_clip": 0.2, "lam0": 0.0, "decay_steps": 50, "weight_fn": "sigmoid", "budget_clip": 2.0,
            "teacher_refresh": 10, "target_span": "action_only", "peer_budget_tokens": 512}


@pytest.mark.parametrize("base", ["grpo", "drgrpo", "rloo"])
def test_stepopsd_with_lambda_zero_is_exactly_its_base(base):
    est = build_estimator({"name": "stepopsd", "base": base, "scale_by_std": True, "stepopsd": STEPOPSD,
                           "teacher": {"micro_batch_rows": 8}})
    assert est.base.name == base
    est.setup(torch.nn.Linear(2, 2), Services(tokenizer=SimpleNamespace(pad_token_id=0)))  # lambda 0: no teacher pass
    out = est.advantages(BATCH, Context(step=0, policy=torch.nn.Linear(2, 2)))
    plain = build_estimator({"name": base, "scale_by_std": True}).advantages(BATCH, Context(step=0))
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.trajectories, plain.trajectories)
    assert out.metrics["stepopsd/lambda"] == 0.0 and out.metrics["stepopsd/rescoring_failed"] == 0.0
    assert set(est.state_dict()) == {"teacher"}  # its clock is the advantage stage's (ctx.step)


def test_stepopsd_refuses_itself_as_base_and_bad_knobs():
    with pytest.raises(ValueError, match="algorithm.base=stepopsd"):
        build_estimator({"name": "stepopsd", "base": "stepopsd", "stepopsd": STEPOPSD})
    with pytest.raises(ValueError, match="micro_batch_rows=0"):
        build_estimator({"name": "stepopsd", "stepopsd": STEPOPSD, "teacher": {"micro_batch_rows": 0}})
    with pytest.raises(ValueError):
        build_estimator({"name": "stepopsd", "stepopsd": STEPOPSD | {"alpha_clip": 2.0}})


def test_stage_state_records_its_estimator_and_loads_a_legacy_teacher_rescoring_state():
    est = build_estimator({"name": "stepopsd", "stepopsd": STEPOPSD | {"teacher_refresh": 0}})
    stage = AdvantageStage(est)
    est.setup(torch.nn.Linear(2, 2), Services())
    legacy = {"step": 7, "teacher": {"taken_at": 4, "weights": None}}  # what TeacherRescoring saved
    assert stage.state_key == "TeacherRescoring"  # StepOPSD's state stays under the former callback's key
    assert AdvantageStage(build_estimator({"name": "grpo"})).state_key == "AdvantageStage"
    stage.load_state_dict(legacy)
    stage.on_train_start(None, None)
    assert stage.step == 7 and est.teacher.taken_at == 4  # the stage's clock is the estimators' t
    assert stage.state_dict() == {"estimator": "stepopsd", "step": 7, "teacher": {"taken_at": 4, "weights": None}}
    assert checkpoint_estimator({"TeacherRescoring": stage.state_dict()}) == "stepopsd"
    assert checkpoint_estimator({"AdvantageStage": {"estimator": "rloo", "step": 2}}) == "rloo"
    assert checkpoint_estimator({"TeacherRescoring": legacy}) == "stepopsd"  # a StepOPSD run before the registry
    assert checkpoint_estimator({}) == "grpo"  # a GRPO run before the registry
