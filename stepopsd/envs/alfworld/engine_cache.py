"""A faster TextWorld PDDL engine for ALFWorld, with the same output: caches of pure functions.

Profiling one ALFWorld step (`AlfWorldEngine.step`, 2-core CPU) shows ~90 % of its time in
TextWorld's context-sensitive grammar (`textworld.envs.pddl.textgen`), which renders the feedback
and every admissible command; profiling a reset shows ~90 % in fast-downward's translator. Three
avoidable costs:

1. `_parse_and_convert(template)` runs the TatSu parser on the same few dozen template strings at
   every step. It is a pure function of its arguments: we parse each template once and hand out a
   deep copy of the parsed symbols (callers set their `context`, so they must not share objects).
2. `copy_context` deep-copies the context's `variables` (name -> EntityInfo) and `mapping`
   (Placeholder -> Variable) for every symbol it expands. The engine only ever adds keys to these
   dicts of the copy (`.update`) and reads the values (template expressions like `obj.name`), so a
   copy of each dict with the same values gives the same text.
3. Loading or resetting a game translates its PDDL domain + problem to fast-downward's SAS form
   twice (`fast_downward.pddl2sas`, plain and optimised), and a reset repeats the load's
   translations: ~90 % of a reset. The translation is a pure function of its text arguments, so
   each (domain, problem, options) is translated once per process and a deep copy handed out;
   the G members of a group, and later steps that draw the same game, reset at the price of a copy.

`install()` applies all three to the imported modules (idempotent); `STEPOPSD_PLAIN_TEXTWORLD=1` in the
environment leaves TextWorld untouched. `tests/test_alfworld_env.py` plays generated games with
random commands both ways and checks that every observation, admissible list and win flag agree.
Measured: `python experiments/benchmarks/env_throughput.py --textgen plain cached` (the switch covers all three).
"""
from __future__ import annotations

import copy
import os

import fast_downward
import textworld.envs.pddl.textgen as textgen

DISABLE_VAR = "STEPOPSD_PLAIN_TEXTWORLD"


def _cached(fn):
    """`fn` memoised on its (hashable) arguments; every caller gets its own deep copy of the result."""
    results: dict = {}

    def call(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = fn(*args, **kwargs)
        return copy.deepcopy(results[key])

    call.stepopsd_cached = True
    return call


def _copy_context(context: dict) -> dict:
    return {
        "state": context["state"],
        "facts": context["facts"],
        "variables": dict(context["variables"]),
        "mapping": dict(context["mapping"]),
        "entity_infos": context["entity_infos"],
    }


def install() -> bool:
    """Patch TextWorld's grammar module and fast-downward's translator in this process (idempotent);
    returns whether the caches are active."""
    if os.environ.get(DISABLE_VAR, "") not in ("", "0"):
        return False
    if not getattr(textgen._parse_and_convert, "stepopsd_cached", False):
        textgen._parse_and_convert = _cached(textgen._parse_and_convert)
        textgen.copy_context = _copy_context
    if not getattr(fast_downward.pddl2sas, "stepopsd_cached", False):
        fast_downward.pddl2sas = _cached(fast_downward.pddl2sas)
    return True
