"""The model config's chat-template arguments (Qwen3: enable_thinking=False) reach every place a chat
template is applied: rollouts (training, validation, eval.py share `RolloutConfig`) and SFT demos.
Hindsight teacher contexts are built on the rollout's prompt ids, so they inherit the same template.

The tokenizer is the project's word-level one with a small Qwen3-like template that writes an empty
`<think></think>` block after the assistant header only when `enable_thinking` is passed as false."""
from __future__ import annotations

import dataclasses
import os

import pytest
from hydra import compose, initialize_config_dir

from stepopsd.callbacks.rollouts import RolloutValidation
from stepopsd.policy.backends.base import Generation
from stepopsd.policy.tokenizer import train_word_tokenizer
from stepopsd.rollout import RolloutConfig, encode_prompt, rollout
from stepopsd.sft import TinySFTConfig, sft_examples
from stepopsd.config import check_config
from stepopsd.types import EnvState, Task, Transition

THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
OFF = {"enable_thinking": False}
PROMPT = "your task is to look at the mug. admissible commands: look, inventory."


@pytest.fixture(scope="module")
def tok():
    tok = train_word_tokenizer([PROMPT, "<think>ok</think><action>look</action>"])
    tok.chat_template = THINKING_TEMPLATE
    return tok


def thinking_off(tok, ids) -> bool:
    """The prompt ends with the template's empty think block."""
    return list(ids[-4:]) == tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"][-4:] and \
        tok.convert_tokens_to_ids("</think>") in ids


def test_encode_prompt_passes_the_template_arguments(tok):
    on, _ = encode_prompt(tok, PROMPT, chat_template=True, max_tokens=4096)
    off, _ = encode_prompt(tok, PROMPT, chat_template=True, max_tokens=4096, template_kwargs=OFF)
    assert not thinking_off(tok, on) and thinking_off(tok, off)
    assert off[:len(on)] == on


class OneStepEnv:
    def reset(self, tasks, group_size):
        self.live = list(range(len(tasks) * group_size))
        return [EnvState("goal", "obs", ("look",)) for _ in self.live]

    def live_slots(self):
        return list(self.live)

    def prompt(self, slot):
        return PROMPT

    def target_chars(self, response, mode):
        return None

    def step(self, responses):
        self.live = []
        return {s: Transition(t, "look", True, 0.0, EnvState("goal", "obs", ("look",), done=True, steps=1))
                for s, t in responses.items()}


class RecordingBackend:
    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    def generate(self, prompts, params, *, seed=None):
        self.prompts += prompts
        return [Generation((self.tok.eos_token_id,), (-0.1,), "stop") for _ in prompts]


TASK = Task("valid_seen/look-mug/trial_0", "look", "game", "valid_seen", generated=True)


@pytest.mark.parametrize("kwargs", [{}, OFF])
def test_rollout_and_validation_prompts_carry_the_template_arguments(tok, kwargs):
    cfg = RolloutConfig(group_size=2, chat_template_kwargs=kwargs)
    validation = RolloutValidation({"valid_seen": [TASK]}, cfg, every=1, samples=1)
    for run_cfg in (cfg, validation.cfg):  # training rollouts; validation (and eval.py: dataclasses.replace)
        backend = RecordingBackend(tok)
        rollout(OneStepEnv(), backend, tok, [TASK], run_cfg)
        assert backend.prompts and all(thinking_off(tok, p) == bool(kwargs) for p in backend.prompts)


def test_sft_demos_carry_the_template_arguments(tok):
    records = [{"prompt": PROMPT, "response": "<think>ok</think><action>look</action>"}]
    for kwargs in ({}, OFF):
        cfg = TinySFTConfig(data="games", chat_template_kwargs=kwargs)
        ((ids, start),) = sft_examples(records, tok, cfg)
        assert thinking_off(tok, ids[:start]) == bool(kwargs)
    # the cache key of the tiny policy changes only when there are template arguments
    assert TinySFTConfig(data="games").key() != TinySFTConfig(data="games", chat_template_kwargs=OFF).key()


def test_qwen3_config_turns_thinking_off_in_the_rollout_config(tok):
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf):
        cfg = compose("train", overrides=["experiment=alfworld_heat", "require_gpu=false"])
    _, _, rollout_cfg = check_config(cfg)
    assert rollout_cfg.chat_template_kwargs == OFF
    ids, _ = encode_prompt(tok, PROMPT, chat_template=rollout_cfg.chat_template, max_tokens=4096,
                           template_kwargs=rollout_cfg.chat_template_kwargs)
    assert thinking_off(tok, ids)
    assert dataclasses.replace(rollout_cfg, group_size=1).chat_template_kwargs == OFF
