"""Tests of the ALFWorld prompt and action protocol."""
import pytest

from stepopsd.envs.alfworld.prompts import (
    INVALID_ACTION_PENALTY,
    WIN_REWARD,
    format_response,
    parse_action,
    render_prompt,
    step_reward,
)

GOAL = "put a clean mug in coffeemachine."
ADMISSIBLE = ["go to countertop 1", "go to sinkbasin 1", "help", "inventory", "look"]
HISTORY = [
    ("You are in the middle of a room.", "go to countertop 1"),
    ("On the countertop 1, you see a mug 1.", "take mug 1 from countertop 1"),
    ("You pick up the mug 1 from the countertop 1.", "go to sinkbasin 1"),
]
OBS = "On the sinkbasin 1, you see nothing."


# ---------------------------------------------------------------- parse_action

@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>ok</think><action>go to desk 1</action>", ("go to desk 1", True)),
        ("go to desk 1", (None, False)),  # no tags
        ("<think>x</think>", (None, False)),  # think only
        ("<action>go to desk 1", (None, False)),  # unclosed
        ("go to desk 1</action>", (None, False)),  # closing tag only
        ("<action></action>", (None, False)),  # empty
        ("<action>  \n\t </action>", (None, False)),  # whitespace only
        ("<action>look</action><action>inventory</action>", ("look", True)),  # first wins
        ("<ACTION>Go To Desk 1</Action>", ("go to desk 1", True)),  # case
        ("<action>\n  take   mug 1\n from\tdesk 1  \n</action>", ("take mug 1 from desk 1", True)),
        ("<action>a <action>look</action>", ("look", True)),  # unclosed then complete
        ("<action> </action><action>look</action>", (None, False)),  # first block empty
        ("blah <action>look</action> trailing <action", ("look", True)),
    ],
)
def test_parse_action_cases(text, expected):
    assert parse_action(text) == expected


def test_parse_action_require_think():
    assert parse_action("<action>look</action>", require_think=True) == (None, False)
    assert parse_action("<think>hm</think>\n<action>look</action>", require_think=True) == ("look", True)
    assert parse_action("<THINK>hm</THINK><action>look</action>", require_think=True) == ("look", True)
    assert parse_action("<think></think><action>look</action>", require_think=True) == ("look", True)
    # think after the action does not count
    assert parse_action("<action>look</action><think>hm</think>", require_think=True) == (None, False)
    # unclosed think
    assert parse_action("<think>hm <action>look</action>", require_think=True) == (None, False)
    # without require_think the same texts are valid
    assert parse_action("<action>look</action><think>hm</think>") == ("look", True)
    assert parse_action("<think>hm <action>look</action>") == ("look", True)


def test_round_trip():
    text = format_response("the mug is on the counter", "take mug 1 from countertop 1")
    assert text == (
        "<think>the mug is on the counter</think><action>take mug 1 from countertop 1</action>"
    )
    assert parse_action(text, require_think=True) == ("take mug 1 from countertop 1", True)


# ---------------------------------------------------------------- render_prompt

def test_full_prompt_history_window():
    p = render_prompt(GOAL, OBS, ADMISSIBLE, HISTORY, 3)
    assert "expert household agent" in p and "ALFRED" in p
    assert "Your task is to: put a clean mug in coffeemachine." in p
    assert "already taken 3 step(s)" in p
    # only the last two pairs, numbered 2 and 3
    assert "[Observation 2: 'On the countertop 1, you see a mug 1.', " \
           "Action 2: 'take mug 1 from countertop 1']" in p
    assert "[Observation 3: 'You pick up the mug 1 from the countertop 1.', " \
           "Action 3: 'go to sinkbasin 1']" in p
    assert "Observation 1" not in p
    assert "You are in the middle of a room." not in p
    assert "step 4" in p and OBS in p
    assert "['go to countertop 1', 'go to sinkbasin 1', 'inventory', 'look']" in p
    assert "'help'" not in p
    assert "<think> </think>" in p and "<action> </action>" in p


def test_history_length_one_and_short_history():
    p = render_prompt(GOAL, OBS, ADMISSIBLE, HISTORY, 3, history_length=1)
    assert "Observation 3:" in p and "Observation 2:" not in p
    p = render_prompt(GOAL, OBS, ADMISSIBLE, HISTORY[:1], 1)
    assert "[Observation 1: 'You are in the middle of a room.', Action 1: 'go to countertop 1']" in p
    assert "Observation 2" not in p


def test_first_step_has_no_history():
    p = render_prompt(GOAL, "You are in the middle of a room.", ADMISSIBLE, [], 0)
    assert "Observation" not in p and "Action 1" not in p
    assert "already taken" not in p
    assert "first step" in p
    assert "Your task is to: put a clean mug in coffeemachine." in p
    assert "You are in the middle of a room." in p
    assert "'help'" not in p and "'look'" in p
    assert len(p) < len(render_prompt(GOAL, "You are in the middle of a room.", ADMISSIBLE,
                                      HISTORY, 3))


def test_help_dropped_defensively():
    for compact in (False, True):
        p = render_prompt(GOAL, OBS, ["help", "look"], [], 0, compact=compact)
        assert "help" not in p and "look" in p


def test_compact_prompt():
    full = render_prompt(GOAL, OBS, ADMISSIBLE, HISTORY, 3)
    c = render_prompt(GOAL, OBS, ADMISSIBLE, HISTORY, 3, compact=True)
    assert len(c) < 0.6 * len(full)
    assert c == (
        "step: 3\n"
        "obs: On the countertop 1, you see a mug 1. | act: take mug 1 from countertop 1\n"
        "obs: You pick up the mug 1 from the countertop 1. | act: go to sinkbasin 1\n"
        "obs: On the sinkbasin 1, you see nothing.\n"
        "actions: go to countertop 1 | go to sinkbasin 1 | inventory | look\n"
        "task: put a clean mug in coffeemachine.\n"
        "answer with <think>...</think><action>...</action>"
    )
    for a in ("go to countertop 1", "go to sinkbasin 1", "inventory", "look"):
        assert a in c
    first = render_prompt(GOAL, "You arrive.", ADMISSIBLE, [], 0, compact=True)
    assert "act:" not in first and "obs: You arrive." in first


def test_deterministic():
    args = (GOAL, OBS, ADMISSIBLE, HISTORY, 3)
    assert render_prompt(*args) == render_prompt(*args)
    assert render_prompt(*args, compact=True) == render_prompt(*args, compact=True)


# ---------------------------------------------------------------- rewards

def test_step_reward():
    assert WIN_REWARD == 10.0 and INVALID_ACTION_PENALTY == 0.1
    assert step_reward(True, True) == 10.0
    assert step_reward(False, False) == pytest.approx(-0.1)
    assert step_reward(True, False) == pytest.approx(9.9)
    assert step_reward(False, True) == 0.0
