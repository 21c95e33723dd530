"""One episode's state, its outcome and its exact per-step credit, as pure functions.

The outcome is additive over the gates and comes only after the last turn:

    R = sum_j w_j * 1[a_(g_j) = right_j]  -  c * #(format-invalid steps)  +  eps,    eps ~ N(0, sigma^2)

(g_j the turn of gate j, w_j its weight, c the invalid-action penalty, charged on its own step as in ALFWorld; sigma
the reward noise). success (won) = every gate opened right. The prompts never depend on the agent's own actions (a
turn's scene is fixed by the game; the history holds past scenes only), so a step's action changes nothing that
later steps see, and E[R | s_k, a_k] - E[R | s_k] keeps only a_k's own terms, for ANY policy pi:

    A_k = w_j * (1[a_k = right_j] - pi(right_j | s_k))  -  c * (1[a_k invalid] - pi(invalid | s_k))   at gate j
    A_k = -c * (1[a_k invalid] - pi(invalid | s_k))                                                 at a distractor

(the noise has mean 0). With a valid action and pi(invalid | s_k) = 0 this is w_j (1[right] - p_right) at a gate and
0 elsewhere. `exact_advantage` computes it for one step; `credit_records` records a finished episode's steps, whose
`StepCredit.advantage(p_right, p_invalid)` a Monte-Carlo probe compares its estimates with.

`CreditState` is frozen and holds plain values: keeping the object (or `copy.deepcopy`) snapshots it, and `advance`
from equal states with equal actions gives equal states (the noise is a hash of the episode, not a generator state).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from stepopsd.envs.credit.game import Game, Turn

INVALID_PENALTY = 0.1  # ALFWorld's invalid-action penalty (stepopsd.envs.alfworld.prompts)
WIN_REWARD = 10.0  # the total weight when no weights are given (ALFWorld's reward for a win)


def gate_weights(weights, pivots: int) -> tuple[float, ...]:
    """w_j per gate: the given ones, or WIN_REWARD / k each; a one-line ValueError for a bad list."""
    if weights is None:
        return (WIN_REWARD / pivots,) * pivots
    weights = tuple(float(w) for w in weights)
    if len(weights) != pivots or min(weights) <= 0:
        raise ValueError(f"env.weights={list(weights)}: give {pivots} positive weights (one per gate, env.pivots="
                         f"{pivots}) or null for {WIN_REWARD / pivots:g} each")
    return weights


@dataclass(frozen=True)
class CreditState:
    """An episode after `len(actions)` steps: the parsed action of each (None: format-invalid)."""

    game: Game
    weights: tuple[float, ...]  # w_j per gate
    actions: tuple[str | None, ...] = ()
    key: str = ""  # names the episode for the reward noise (run seed, task id, member)

    @property
    def turn(self) -> int:
        """Index of the turn the agent acts on next (= steps taken)."""
        return len(self.actions)

    @property
    def done(self) -> bool:
        return self.turn >= len(self.game.turns)

    @property
    def current(self) -> Turn:
        return self.game.turns[self.turn]

    @property
    def hits(self) -> tuple[bool, ...]:
        """Per gate: opened right (False for gates not reached yet)."""
        return tuple(t < self.turn and self.actions[t] == self.game.turns[t].right for t in self.game.gates)

    @property
    def won(self) -> bool:
        return self.done and all(self.hits)


def start(game: Game, weights=None, key: str = "") -> CreditState:
    return CreditState(game, gate_weights(weights, len(game.gates)), (), key)


def advance(state: CreditState, action: str | None) -> CreditState:
    """The state after one more step (`action` None: a format-invalid step; any text counts, admissible or not)."""
    if state.done:
        raise ValueError(f"the episode is over after {state.turn} turns: no further step")
    return CreditState(state.game, state.weights, state.actions + (action,), state.key)


def is_pivotal(state: CreditState) -> bool:
    """Is the turn the agent acts on next a gate?"""
    return state.current.pivot >= 0


def right_action(state: CreditState) -> str | None:
    """The right action of the next turn when it is a gate; None at a distractor."""
    return state.current.right if is_pivotal(state) else None


def outcome(state: CreditState) -> float:
    """sum_j w_j 1[gate j opened right]: the noise-free final reward (penalties apart)."""
    return sum(w for w, hit in zip(state.weights, state.hits) if hit)


def reward_noise(state: CreditState, sigma: float) -> float:
    """eps ~ N(0, sigma^2), drawn from a hash of the episode (its key and actions): the same episode always gets the
    same eps, so a resumed run or a restored state reproduces it, and other continuations draw afresh."""
    if sigma == 0:
        return 0.0
    text = state.key + "\x1f" + "\x1f".join("\x00" if a is None else a for a in state.actions)
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")).gauss(0.0, sigma)


def step_reward(after: CreditState, valid: bool, *, penalty: float = INVALID_PENALTY, sigma: float = 0.0) -> float:
    """The reward of the step that led to `after`: -penalty when it was format-invalid, plus R's outcome and noise
    when it was the last."""
    final = outcome(after) + reward_noise(after, sigma) if after.done else 0.0
    return final - penalty * (not valid)


def exact_advantage(state: CreditState, action: str | None, p_right: float, p_invalid: float = 0.0, *,
                    penalty: float = INVALID_PENALTY) -> float:
    """A_k = Q(s_k, a_k) - V(s_k) of `action` (None: format-invalid) in `state`, for a policy that there picks the
    gate's right action with probability `p_right` and a format-invalid step with `p_invalid` (module docstring)."""
    turn = state.current
    gate = state.weights[turn.pivot] * ((action == turn.right) - p_right) if turn.pivot >= 0 else 0.0
    return gate - penalty * ((action is None) - p_invalid)


@dataclass(frozen=True)
class StepCredit:
    """One step of a finished episode and what its exact credit depends on."""

    turn: int  # 0-based
    pivot: int  # gate index j, -1 at a distractor
    weight: float  # w_j (0 at a distractor)
    right: str  # the right action at a gate ("" elsewhere)
    action: str | None  # what was done (None: format-invalid)
    penalty: float = INVALID_PENALTY

    @property
    def hit(self) -> bool:
        return self.pivot >= 0 and self.action == self.right

    def advantage(self, p_right: float = 0.0, p_invalid: float = 0.0) -> float:
        """The exact A_k under a policy with these probabilities at this step (p_right is unused off a gate)."""
        gate = self.weight * (self.hit - p_right) if self.pivot >= 0 else 0.0
        return gate - self.penalty * ((self.action is None) - p_invalid)


def credit_records(game: Game, actions, weights=None, *, penalty: float = INVALID_PENALTY) -> list[StepCredit]:
    """Every step of an episode of `game` with these parsed actions (None: format-invalid)."""
    w = gate_weights(weights, len(game.gates))
    return [StepCredit(t, game.turns[t].pivot, w[game.turns[t].pivot] if game.turns[t].pivot >= 0 else 0.0,
                       game.turns[t].right, a, penalty) for t, a in enumerate(actions)]
