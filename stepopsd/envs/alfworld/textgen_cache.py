"""Faster text generation in TextWorld's PDDL engine, with the same output.

Profiling one ALFWorld step (`AlfWorldEngine.step`, 2-core CPU) shows ~90 % of its time in
TextWorld's context-sensitive grammar (`textworld.envs.pddl.textgen`), which renders the feedback
and every admissible command through two avoidable costs:

1. `_parse_and_convert(template)` runs the TatSu parser on the same few dozen template strings at
   every step. It is a pure function of its arguments: we parse each template once and hand out a
   deep copy of the parsed symbols (callers set their `context`, so they must not share objects).
2. `copy_context` deep-copies the context's `variables` (name -> EntityInfo) and `mapping`
   (Placeholder -> Variable) for every symbol it expands. The engine only ever adds keys to these
   dicts of the copy (`.update`) and reads the values (template expressions like `obj.name`), so a
   copy of each dict with the same values gives the same text.

`install()` applies both to the imported module (idempotent); `STEPOPSD_PLAIN_TEXTWORLD=1` in the
environment leaves TextWorld untouched. `tests/test_alfworld_env.py` plays generated games with
random commands both ways and checks that every observation, admissible list and win flag agree.
Measured: `python experiments/benchmarks/engine_speed.py`.
"""
from __future__ import annotations

import copy
import os

import textworld.envs.pddl.textgen as textgen

DISABLE_VAR = "STEPOPSD_PLAIN_TEXTWORLD"


def _cached_parser(parse):
    parsed: dict = {}

    def parse_and_convert(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = parse(*args, **kwargs)
        return copy.deepcopy(parsed[key])

    parse_and_convert.stepopsd_cached = True
    return parse_and_convert


def _copy_context(context: dict) -> dict:
    return {
        "state": context["state"],
        "facts": context["facts"],
        "variables": dict(context["variables"]),
        "mapping": dict(context["mapping"]),
        "entity_infos": context["entity_infos"],
    }


def install() -> bool:
    """Patch TextWorld's grammar module in this process; returns whether the patch is active."""
    if os.environ.get(DISABLE_VAR, "") not in ("", "0"):
        return False
    if not getattr(textgen._parse_and_convert, "stepopsd_cached", False):
        textgen._parse_and_convert = _cached_parser(textgen._parse_and_convert)
        textgen.copy_context = _copy_context
    return True
