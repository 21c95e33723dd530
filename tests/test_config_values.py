"""Bad knob values of the algorithm, rollout and sampling dataclasses (`PPOConfig`, `RolloutConfig`,
`StepOPSDConfig`, `SamplingParams`) raise a one-line `ValueError` naming the knob; their defaults are valid."""
from __future__ import annotations

import pytest

from stepopsd.algorithms.stepopsd import StepOPSDConfig
from stepopsd.module import PPOConfig
from stepopsd.policy.backends.base import SamplingParams
from stepopsd.rollout import RolloutConfig


BAD_CONFIGS = [
    (PPOConfig, dict(lr=0.0)), (PPOConfig, dict(epochs=0)), (PPOConfig, dict(mini_batch_rows=0)),
    (PPOConfig, dict(clip_low=1.0)), (PPOConfig, dict(clip_high=0.0)), (PPOConfig, dict(agg="sum")),
    (PPOConfig, dict(kl_coef=-0.1)), (PPOConfig, dict(entropy_coef=-1.0)), (PPOConfig, dict(max_grad_norm=0.0)),
    (PPOConfig, dict(temperature=0.0)),
    (RolloutConfig, dict(group_size=0)), (RolloutConfig, dict(max_prompt_tokens=8)),
    (RolloutConfig, dict(target_mode="actions")),
    (StepOPSDConfig, dict(alpha_clip=0.0)), (StepOPSDConfig, dict(alpha_clip=1.5)), (StepOPSDConfig, dict(lam0=-0.1)),
    (StepOPSDConfig, dict(lam0=1.5)), (StepOPSDConfig, dict(weight_fn="tanh")), (StepOPSDConfig, dict(budget_clip=0.5)),
    (StepOPSDConfig, dict(decay_steps=0)), (StepOPSDConfig, dict(teacher_refresh=-1)),
    (StepOPSDConfig, dict(target_span="whole")), (StepOPSDConfig, dict(peer_budget_tokens=0)),
    (SamplingParams, dict(max_new_tokens=0)), (SamplingParams, dict(top_p=0.0)),
]


@pytest.mark.parametrize("cls,kwargs", BAD_CONFIGS, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_bad_config_values_raise_one_line(cls, kwargs):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert message and "\n" not in message
    assert any(name.rstrip("0") in message for name in kwargs)  # names the knob (lam0 -> "lam")
    cls()  # the defaults are valid
