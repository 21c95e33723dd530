"""A faster TextWorld PDDL engine for ALFWorld, with the same output: caches of pure functions.

Profiling one ALFWorld step (`AlfWorldEngine.step`, 2-core CPU) shows ~90 % of its time in
TextWorld's context-sensitive grammar (`textworld.envs.pddl.textgen`), which renders the feedback
and every admissible command; profiling a reset shows ~90 % in fast-downward's translator. Avoidable costs:

1. `_parse_and_convert(template)` runs the TatSu parser on the same few dozen template strings at
   every step. It is a pure function of its arguments: we parse each template once and hand out a
   copy of the parsed symbols (callers set their `context`, so they must not share objects),
   unpickled from their pickle, which costs less than `copy.deepcopy` of the same objects.
   Loading a game likewise parses the grammar file (the same text for every game) into its actions
   and grammar rules (`textworld.envs.pddl.logic._parse_and_convert`, also a fresh converter per
   call): memoised the same way.
2. `copy_context` deep-copies the context's `variables` (name -> EntityInfo) and `mapping`
   (Placeholder -> Variable) for every symbol it expands. The engine only ever adds keys to these
   dicts of the copy (`.update`) and reads the values (template expressions like `obj.name`), so a
   copy of each dict with the same values gives the same text.
3. Loading or resetting a game translates its PDDL domain + problem to fast-downward's SAS form
   twice (`fast_downward.pddl2sas`, plain and optimised), and a reset repeats the load's
   translations: ~90 % of a reset (about 0.5 s a game). The translation is a pure function of its
   text arguments, so each (domain, problem, options) is translated once and kept as its pickle; each
   caller unpickles its own copy (faster than `copy.deepcopy`). It is kept in memory and on disk
   (see 5), so the G members of a group, later steps that draw the same game, other worker processes
   and later runs all reset at the price of that copy.
4. With 1-3 in place, about half of a step is still TatSu parsing: the grammar's conditional
   symbols (`{...|given}`) parse their `given` query with `Rule.parse_conjunctive_query` at every
   expansion, a few dozen distinct strings thousands of times per episode. The parse depends on the
   string alone (a fresh converter per call), and its result is a tuple of predicates, value objects
   that TextWorld never changes after construction; so each query is parsed once per process and every
   call gets a new `Rule` over the same predicates (no copy needed: a deep copy would cost a third of
   the step again).
5. On disk the translations are content-addressed: a zlib-compressed pickle named by a hash of the
   translator's version and arguments, in `$STEPOPSD_TRANSLATIONS` (default
   `$XDG_CACHE_HOME/stepopsd/translations`, i.e. `~/.cache/stepopsd/translations`;
   `STEPOPSD_TRANSLATIONS=0` keeps them in memory only), written atomically, so processes and runs
   share them safely (about 100 KB a game). Before, every worker of every run translated each game
   it hosted again: the largest part of a training step's environment time. Game generation and the
   SFT demonstrations play every game with the expert first, so training and validation resets find
   their translations there. A folder that cannot be written leaves the cache in memory only.

`install()` applies all five to the imported modules (idempotent); `STEPOPSD_PLAIN_TEXTWORLD=1` in the
environment leaves TextWorld untouched. `tests/test_alfworld_env.py` plays generated games with
random commands both ways and checks that every observation, admissible list and win flag agree.
Measured: `python experiments/benchmarks/env_throughput.py --textgen plain cached` (the switch covers all five).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import os
import pickle
import zlib

import fast_downward
import textworld.envs.pddl.logic as pddl_logic
import textworld.envs.pddl.textgen as textgen
from textworld.logic import Rule

DISABLE_VAR = "STEPOPSD_PLAIN_TEXTWORLD"


def _cached(fn):
    """`fn` memoised on its (hashable) arguments; every caller gets its own copy of the result, unpickled
    from the result's pickle (the objects `copy.deepcopy` would give, for less)."""
    results: dict = {}

    def call(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = pickle.dumps(fn(*args, **kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        return pickle.loads(results[key])

    call.stepopsd_cached = True
    return call


TRANSLATIONS_VAR = "STEPOPSD_TRANSLATIONS"


def translations_dir() -> str | None:
    """Where translations are kept on disk (5 above); None: in memory only."""
    folder = os.environ.get(TRANSLATIONS_VAR)
    if folder == "0":
        return None
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return folder or os.path.join(cache, "stepopsd", "translations")


TRANSLATIONS_IN_MEMORY = 128  # games whose translation a process keeps in memory (~1.2 MB each); the rest on disk


def _translation_cache(translate, keep: int = TRANSLATIONS_IN_MEMORY):
    """fast-downward's `pddl2sas` memoised in memory (the `keep` most recently used games: a worker that meets
    thousands of games over a run would otherwise grow by ~1.2 MB per game) and on disk (3 and 5 above)."""
    pickles: collections.OrderedDict = collections.OrderedDict()
    version = importlib.metadata.version("fast_downward_textworld")

    def call(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key in pickles:
            pickles.move_to_end(key)
        else:
            folder = translations_dir()
            digest = hashlib.sha1(pickle.dumps((version, key))).hexdigest()
            path = os.path.join(folder, f"{digest}.pkl.z") if folder else None
            pickles[key] = _read(path)
            if pickles[key] is None:
                pickles[key] = pickle.dumps(translate(*args, **kwargs), protocol=pickle.HIGHEST_PROTOCOL)
                _write(path, pickles[key])
                call.translations += 1
            while len(pickles) > keep:
                pickles.popitem(last=False)
        return pickle.loads(pickles[key])

    call.stepopsd_cached = True
    call.translations = 0  # translations actually run in this process (the rest came from memory or disk)
    return call


def _read(path: str | None) -> bytes | None:
    """The pickle kept at `path`, or None (no file, or one that does not unpickle)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            data = zlib.decompress(f.read())
        pickle.loads(data)
        return data
    except Exception:  # a damaged file: translated again and replaced
        return None


def _write(path: str | None, data: bytes) -> None:
    """Write `data` to `path` compressed, atomically (readers never see half a file)."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(zlib.compress(data, 1))
        os.replace(tmp, path)
    except OSError:  # a folder that cannot be written: the cache stays in memory
        try:
            os.remove(tmp)
        except OSError:
            pass


def _cached_query(parse):
    """`Rule.parse_conjunctive_query` with each query string parsed once (see 4 above)."""
    preconditions: dict[str, tuple] = {}

    def parse_conjunctive_query(cls, expr: str):
        if expr not in preconditions:
            preconditions[expr] = parse(cls, expr).preconditions
        return cls("query", preconditions[expr], [])

    parse_conjunctive_query.stepopsd_cached = True
    return parse_conjunctive_query


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
    if not getattr(pddl_logic._parse_and_convert, "stepopsd_cached", False):
        pddl_logic._parse_and_convert = _cached(pddl_logic._parse_and_convert)
    if not getattr(Rule.parse_conjunctive_query, "stepopsd_cached", False):
        Rule.parse_conjunctive_query = classmethod(_cached_query(Rule.parse_conjunctive_query.__func__))
    if not getattr(fast_downward.pddl2sas, "stepopsd_cached", False):
        fast_downward.pddl2sas = _translation_cache(fast_downward.pddl2sas)
    return True
