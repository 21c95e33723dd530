"""The controlled credit-assignment games: knobs, the generator, the files, the expert.

A game is `horizon` turns. `pivots` of them are gates: the agent opens one of `choices` coloured doors, and exactly
one is right, named by a note shown `delay` turns earlier (delay 0: on the gate's own turn). Every other turn is a
distractor: `choices` things to look at, none of which matters. The outcome comes only after the last turn
(`stepopsd.envs.credit.credit`): R = sum_j w_j * 1[gate j opened right], the weights w_j, the noise and the
invalid-action penalty being the environment's reward knobs, not the game's.

    knob          meaning
    horizon       turns per episode (H)
    pivots        gates per episode (k); gate j always has the same `choices` door colours (COLOURS' j-th block, listed
                  in a random order), so notes never clash, and which one is right is random
    choices       admissible actions per turn, gates and distractors alike
    delay         turns from a gate's note to the gate
    placement     early: gates on the first turns a note allows (turns delay+1 .. delay+k, 1-based);
                  spread: evenly from turn delay+1 to turn H; random: k random turns from delay+1 .. H per game
    clue_shown    once: the note only on its turn (the agent must remember it through the prompt's history);
                  until_pivot: repeated on every turn from its own to the gate's
    hidden_clues  probability that a gate's note is never shown (that gate is a blind guess)

A game depends only on (seed, split, index) and the knobs: `make_games` writes `<folder>/<split>.jsonl`, one game a
line, and `meta.json` with the knobs and the seed; every game says it is generated (`"data": "generated"`).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field

SPLITS = ("train", "valid")
TASK_TYPE = "credit"  # one task type: validation reports success and success_credit
PLACEMENTS = ("early", "spread", "random")
CLUE_SHOWN = ("once", "until_pivot")
GOAL = "at each gate open the door its note points to"
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown", "grey", "silver",
           "gold", "violet", "cyan", "amber")
SIGNS = ("fox", "whale", "frog", "bee", "swan", "crow", "tiger", "crab", "pig", "mole", "owl", "cat", "dog", "lion",
         "seal", "yak")  # a note's animal points to the door of the colour at the same index (the world's rule)
THINGS = ("lamp", "rug", "vase", "chair", "clock", "mirror", "barrel", "crate", "painting", "bench", "chest", "candle",
          "statue", "shelf", "basket", "bell")
ROOMS = ("hall", "kitchen", "cellar", "library", "garden", "attic", "study", "pantry", "gallery", "chapel", "workshop",
         "tower")


@dataclass(frozen=True)
class GameKnobs:
    """What a game is made of (the `env` knobs of the same names); each bad value is a one-line ValueError."""

    horizon: int = 6
    pivots: int = 1
    choices: int = 4
    delay: int = 1
    placement: str = "early"
    clue_shown: str = "once"
    hidden_clues: float = 0.0

    def __post_init__(self):
        if self.horizon < 1:
            raise ValueError(f"env.horizon={self.horizon}: an episode needs at least 1 turn; set env.horizon >= 1")
        if self.pivots < 1:
            raise ValueError(f"env.pivots={self.pivots}: a game needs at least one gate; set env.pivots >= 1")
        if self.delay < 0:
            raise ValueError(f"env.delay={self.delay}: a note comes before (or on) its gate's turn; set env.delay >= 0")
        if self.delay + self.pivots > self.horizon:
            raise ValueError(f"env.pivots={self.pivots} with env.delay={self.delay} need env.horizon >= "
                             f"{self.delay + self.pivots} (every gate after its note); raise env.horizon or lower them")
        if self.choices < 2 or self.choices > len(THINGS):
            raise ValueError(f"env.choices={self.choices}: use 2 to {len(THINGS)} admissible actions per turn")
        if self.choices * self.pivots > len(COLOURS):
            raise ValueError(f"env.choices={self.choices} x env.pivots={self.pivots} doors exceed the {len(COLOURS)} "
                             "colours (each gate's doors differ from the others'); lower one of them")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"env.placement={self.placement}: use one of {', '.join(PLACEMENTS)}")
        if self.clue_shown not in CLUE_SHOWN:
            raise ValueError(f"env.clue_shown={self.clue_shown}: use one of {', '.join(CLUE_SHOWN)}")
        if not 0.0 <= self.hidden_clues <= 1.0:
            raise ValueError(f"env.hidden_clues={self.hidden_clues}: a probability per gate; use a value in [0, 1]")


@dataclass(frozen=True)
class Turn:
    """One turn as the agent meets it. At a gate `pivot` is its index j (else -1), `right` its right action."""

    observation: str
    admissible: tuple[str, ...]
    pivot: int = -1
    right: str = ""


@dataclass(frozen=True)
class Game:
    turns: tuple[Turn, ...]
    clue_turns: tuple[int, ...]  # turn index of each gate's note (-1: hidden)
    goal: str = GOAL
    generated: bool = field(default=True)

    @property
    def gates(self) -> tuple[int, ...]:
        """Turn index of each gate, in gate order."""
        return tuple(t for t, turn in enumerate(self.turns) if turn.pivot >= 0)


def gate_turns(knobs: GameKnobs, rng: random.Random) -> list[int]:
    """0-based turn indices of the k gates (sorted)."""
    first, last, k = knobs.delay, knobs.horizon - 1, knobs.pivots
    if knobs.placement == "early":
        return list(range(first, first + k))
    if knobs.placement == "spread":
        return [first] if k == 1 else [first + round(j * (last - first) / (k - 1)) for j in range(k)]
    return sorted(rng.sample(range(first, last + 1), k))


def make_game(knobs: GameKnobs, rng: random.Random) -> Game:
    """One game from `rng` (see the module docstring for what the knobs do)."""
    gates = gate_turns(knobs, rng)
    doors = [rng.sample(COLOURS[j * knobs.choices:(j + 1) * knobs.choices], knobs.choices) for j in range(knobs.pivots)]
    right = [rng.choice(d) for d in doors]
    hidden = [rng.random() < knobs.hidden_clues for _ in gates]
    clue_turns = tuple(-1 if h else g - knobs.delay for g, h in zip(gates, hidden))
    notes: list[list[str]] = [[] for _ in range(knobs.horizon)]
    for j, (g, c) in enumerate(zip(gates, clue_turns)):
        if c < 0:
            continue
        for t in range(c, g + 1 if knobs.clue_shown == "until_pivot" else c + 1):
            notes[t].append(f"note: follow the {SIGNS[COLOURS.index(right[j])]}.")
    turns = []
    for t in range(knobs.horizon):
        if t in gates:
            j = gates.index(t)
            scene = f"gate {j + 1} with doors " + ", ".join(doors[j]) + "."
            turn = dict(admissible=tuple(f"open {c} door" for c in doors[j]), pivot=j, right=f"open {right[j]} door")
        else:
            things = rng.sample(THINGS[:knobs.choices], knobs.choices)
            scene = f"{rng.choice(ROOMS)} with " + ", ".join(things) + "."
            turn = dict(admissible=tuple(f"look at {x}" for x in things))
        turns.append(Turn(" ".join([scene, *notes[t]]), **turn))
    return Game(tuple(turns), clue_turns)


def game_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of game `index` of `split` (string seeds hash the same way in every process)."""
    return random.Random(f"credit/{seed}/{split}/{index}")


def make_games(folder: str, knobs: GameKnobs, seed: int, counts: dict[str, int]) -> dict[str, int]:
    """Write `<folder>/<split>.jsonl` (count games each) and `meta.json`; returns the counts written."""
    os.makedirs(folder, exist_ok=True)
    for split, n in counts.items():
        tmp = os.path.join(folder, f"{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            for i in range(n):
                f.write(json.dumps(asdict(make_game(knobs, game_rng(seed, split, i)))) + "\n")
        os.replace(tmp, os.path.join(folder, f"{split}.jsonl"))
    meta = {"knobs": asdict(knobs), "seed": seed, "counts": counts, "data": "generated"}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return counts


def game_of(record: dict) -> Game:
    turns = tuple(Turn(t["observation"], tuple(t["admissible"]), t["pivot"], t["right"]) for t in record["turns"])
    return Game(turns, tuple(record["clue_turns"]), record["goal"], record["generated"])


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {folder} holds no credit games; leave data.path at its default "
                                "(generated there) or point it at a folder made by make_games")
    with open(path) as f:
        return json.load(f)


_GAMES: dict[tuple[str, float], tuple[Game, ...]] = {}


def read_games(path: str) -> tuple[Game, ...]:
    """Every game of one split file (cached by path and modification time)."""
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _GAMES:
        with open(path) as f:
            _GAMES[key] = tuple(game_of(json.loads(line)) for line in f if line.strip())
    return _GAMES[key]


def misread_action(turn: Turn) -> str:
    """At a gate, the door a misread note points to: the next colour after the right one (in COLOURS' order, cyclic
    over the gate's doors). The erring expert's mistake: one consistent wrong door, not a random one."""
    colours = sorted((a.split()[1] for a in turn.admissible), key=COLOURS.index)
    return f"open {colours[(colours.index(turn.right.split()[1]) + 1) % len(colours)]} door"


def expert_action(turn: Turn, rng: random.Random | None = None) -> str:
    """The expert: the right door at a gate (it knows the answer even where the note is hidden); at a distractor any
    admissible action (random with `rng`, else the first)."""
    if turn.pivot >= 0:
        return turn.right
    return rng.choice(turn.admissible) if rng is not None else turn.admissible[0]
