"""The policy tests' word tokenizer and tiny Qwen3, trained/built in-process from literal ALFWorld-protocol text
(fixtures `tok` and `tiny`; import them into a test module to use them there)."""
import pytest

from stepopsd.envs.alfworld.prompts import format_response, render_prompt
from stepopsd.policy.tiny import build_tiny_policy
from stepopsd.policy.tokenizer import train_word_tokenizer

from helpers.alfworld_text import ADMISSIBLE, GOAL, OBS

RESPONSES = [
    format_response("my task is to put a clean mug in coffeemachine. next i should go to countertop 1.", "go to countertop 1"),
    format_response("i see a mug 1 here, so i take it.", "take mug 1 from countertop 1"),
    format_response("now i clean the mug 1 with the sinkbasin 1.", "clean mug 1 with sinkbasin 1"),
    format_response("the mug is clean; next i put it in the coffeemachine 1.", "put mug 1 in/on coffeemachine 1"),
]


def corpus() -> list[str]:
    texts, history = [], []
    for k, obs in enumerate(OBS):
        for compact in (False, True):
            texts.append(render_prompt(GOAL, obs, ADMISSIBLE, history, k, compact=compact))
        if k < len(RESPONSES):
            texts.append(RESPONSES[k])
            history.append((obs, RESPONSES[k].split("<action>")[1].split("</action>")[0]))
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_word_tokenizer(corpus())


@pytest.fixture(scope="module")
def tiny(tok):
    return build_tiny_policy(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]
