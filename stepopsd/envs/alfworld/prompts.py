"""ALFWorld agent protocol: the per-step prompt, action parsing and step reward.

Implements the verl-agent / SDAR step protocol (see shared/spec/environments.md, "ALFWorld,
Protocol") in this project's own wording: every environment step is a fresh prompt holding the
task, the number of steps already taken, the last `history_length` (observation, action) pairs,
the current observation and the admissible commands (`help` removed); the model reasons inside
`<think>...</think>` and names one command inside `<action>...</action>`.

Simplifications: no system prompt and no chat template here (the caller wraps the text); the
action is not checked against the admissible list (the engine answers an inadmissible command
with "Nothing happens."); validity only concerns the format. A `compact=True` template carries
the same information in far fewer tokens for tiny word-level-tokenizer policies.
"""
from __future__ import annotations

import re
from typing import Sequence

INVALID_ACTION_PENALTY = 0.1
WIN_REWARD = 10.0

# A complete block whose body holds no further opening tag, so that an unclosed opening tag
# followed by a complete block yields the complete one.
_ACTION_RE = re.compile(r"<action>((?:(?!<action>).)*?)</action>", re.IGNORECASE | re.DOTALL)
_THINK_RE = re.compile(r"<think>((?:(?!<think>).)*?)</think>", re.IGNORECASE | re.DOTALL)


def parse_action(text: str, *, require_think: bool = False) -> tuple[str | None, bool]:
    """Extract the command from a model response. Returns (action, valid).

    The action is the body of the FIRST complete `<action>...</action>` block, stripped, with
    every whitespace run (spaces, tabs, newlines) collapsed to one space, lower-cased.
    Tags match case-insensitively (`<Action>`, `</ACTION>`).

    Edge cases, all giving (None, False):
      - no `<action>` tag, or an opening tag that is never closed;
      - a block whose body is empty or only whitespace (a later block is NOT tried);
      - with require_think=True (instruction-tuned models): no complete `<think>...</think>`
        block ending before the action block starts (missing, unclosed, or placed after the
        action). An empty think block counts as present.
    Anything after the first action block (e.g. a second action) is ignored. An unclosed
    `<action>` followed by a complete block yields the complete block.
    """
    m = _valid_action_match(text, require_think)
    return (" ".join(m.group(1).split()).lower(), True) if m else (None, False)


def action_span(text: str, *, require_think: bool = False) -> tuple[int, int] | None:
    """Character span [start, end) of the action block, tags included, that `parse_action` reads;
    None when the step is invalid. It is the step target Z_k in `action_only` mode (spec §5)."""
    m = _valid_action_match(text, require_think)
    return m.span() if m else None


def target_chars(text: str, mode: str, *, require_think: bool = False, env: str = "ALFWorld") -> tuple[int, int] | None:
    """Character span of the step target Z_k in a response of an `<action>`-protocol environment (spec §5): the
    action block (`action_only`) or the whole response (`full_step`), None for an invalid step."""
    span = action_span(text, require_think=require_think)
    if mode == "action_only":
        return span
    if mode == "full_step":
        return (0, len(text)) if span else None
    raise ValueError(f"target mode {mode!r} does not apply to {env}: use action_only or full_step")


def _valid_action_match(text: str, require_think: bool) -> re.Match | None:
    m = _ACTION_RE.search(text)
    if m is None or not m.group(1).strip():
        return None
    if require_think and _THINK_RE.search(text, 0, m.start()) is None:
        return None
    return m


def format_response(think: str, action: str) -> str:
    """A well-formed response, e.g. for expert demonstrations."""
    return f"<think>{think}</think><action>{action}</action>"


def step_reward(won: bool, valid: bool) -> float:
    """WIN_REWARD on the winning step, minus INVALID_ACTION_PENALTY for a malformed step."""
    return WIN_REWARD * bool(won) - INVALID_ACTION_PENALTY * (not valid)


def _commands(admissible: Sequence[str]) -> list[str]:
    return [a for a in admissible if a.strip().lower() != "help"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render_prompt(
    goal: str,
    observation: str,
    admissible: Sequence[str],
    history: Sequence[tuple[str, str]],
    steps_taken: int,
    *,
    history_length: int = 2,
    compact: bool = False,
) -> str:
    """The prompt for the current step.

    `history` is every earlier (observation, action) pair, oldest first; pair i (0-based) is
    step i + 1 and only the last `history_length` pairs are shown, under their real step
    numbers. The current step is `steps_taken + 1`. With no earlier step (steps_taken == 0 and
    empty history) a shorter first-step wording without any history part is used. `help` is
    dropped from `admissible`. Deterministic in its inputs.
    """
    commands = _commands(admissible)
    n_shown = max(0, min(history_length, len(history)))
    first = len(history) - n_shown
    shown = [(first + j + 1, obs, act) for j, (obs, act) in enumerate(history[first:])]

    if compact:
        # the task comes last, next to where the answer starts: a tiny model attends to it far better
        lines = [f"step: {steps_taken}"]
        lines += [f"obs: {_one_line(o)} | act: {_one_line(a)}" for _, o, a in shown]
        lines.append(f"obs: {_one_line(observation)}")
        lines.append("actions: " + " | ".join(commands))
        lines.append(f"task: {_one_line(goal)}")
        lines.append("answer with <think>...</think><action>...</action>")
        return "\n".join(lines)

    listed = "[" + ", ".join(f"'{c}'" for c in commands) + "]"
    head = (
        "You are an expert household agent acting in a text-based ALFRED environment. "
        f"Your task is to: {goal}\n"
    )
    if steps_taken == 0 and not history:
        body = (
            f"This is your first step. What you currently observe: {observation}\n"
            f"Your admissible actions now are: {listed}.\n"
        )
    else:
        body = f"You have already taken {steps_taken} step(s). "
        if shown:
            past = " ".join(f"[Observation {k}: '{o}', Action {k}: '{a}']" for k, o, a in shown)
            body += (
                f"Here are your {len(shown)} most recent observation(s) and the action taken "
                f"after each: {past}\n"
            )
        body += (
            f"You are now at step {steps_taken + 1}, and you observe: {observation}\n"
            f"Your admissible actions now are: {listed}.\n"
        )
    tail = (
        "First think step by step about the current situation and what to do next, and write "
        "that reasoning inside <think> </think> tags. Then choose exactly one of the admissible "
        "actions and write it inside <action> </action> tags."
    )
    return head + body + "\n" + tail


def peer_lines(trajectory) -> list[str]:
    """Hindsight peer serialisation for ALFWorld (spec §6): the peer's valid actions, numbered by step,
    observations dropped. `trajectory` is a `stepopsd.types.Trajectory`."""
    return [f"{k + 1}. {s.transition.action}" for k, s in enumerate(trajectory.steps) if s.transition.valid]
