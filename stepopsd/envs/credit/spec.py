"""The credit-assignment lab as a run uses it (`env=credit`): generated games in `<data.path>/<split>.jsonl` (made
from the `env` knobs and `data.generate` when missing; the folder's `meta.json` must match the knobs), played by
`CreditEnv` in the run's process; no service; peers written as ALFWorld's numbered action lists; the tiny policy
warm-started on erring-expert episodes, optionally with hindsight examples in the teacher's format."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import List, Optional

from omegaconf import II

from stepopsd.envs.alfworld.prompts import peer_lines
from stepopsd.envs.credit.credit import INVALID_PENALTY, gate_weights
from stepopsd.envs.credit.game import SPLITS, TASK_TYPE, GameKnobs, make_games, read_meta
from stepopsd.envs.registry import EnvConfig, EnvSpec, register_env
from stepopsd.errors import UserError

PEER_EXAMPLE = "1. look at lamp\n2. open red door"  # a peer block in the tokenizer's texts


class CreditDataError(UserError, ValueError):
    """A data folder whose games were made with other knobs than the run's (or holds none)."""


@dataclass
class CreditConfig(EnvConfig):
    """The credit games (`game.GameKnobs`: horizon ... hidden_clues) and their reward (weights, noise, penalty);
    an episode is exactly `horizon` steps (max_steps follows it)."""

    max_steps: int = II(".horizon")
    horizon: int = 6  # H: turns per episode
    pivots: int = 1  # k: gates whose door decides the outcome
    choices: int = 4  # admissible actions per turn
    delay: int = 1  # turns from a gate's note to the gate
    placement: str = "early"  # early | spread | random: where the gates are
    clue_shown: str = "once"  # once (remember it through the history) | until_pivot (repeated up to the gate)
    hidden_clues: float = 0.0  # probability that a gate's note is never shown
    weights: Optional[List[float]] = None  # w_j per gate (null: 10 / pivots each)
    reward_noise: float = 0.0  # std of the Gaussian noise added to the final reward
    invalid_penalty: float = INVALID_PENALTY  # per format-invalid step, as ALFWorld


def game_knobs(env) -> GameKnobs:
    """The game knobs of an `env` config node (one-line ValueError for a bad one)."""
    return GameKnobs(**{f.name: env[f.name] for f in fields(GameKnobs)})


@register_env("credit")
class CreditSpec(EnvSpec):
    config = CreditConfig
    hindsight_demonstrations = True

    def check(self, cfg):
        e = cfg.env
        knobs = game_knobs(e)
        gate_weights(None if e.weights is None else list(e.weights), knobs.pivots)
        if e.max_steps != knobs.horizon:
            raise ValueError(f"env.max_steps={e.max_steps}: a credit episode is exactly env.horizon={knobs.horizon} "
                             "steps; set env.horizon instead")
        if e.reward_noise < 0 or e.invalid_penalty < 0:
            raise ValueError(f"env.reward_noise={e.reward_noise}, env.invalid_penalty={e.invalid_penalty}: "
                             "each must be >= 0")
        if knobs.clue_shown == "once" and e.history_length < knobs.delay:
            raise ValueError(f"env.history_length={e.history_length} < env.delay={knobs.delay}: a note shown once leaves "
                             f"the prompt before its gate; set env.history_length >= {knobs.delay} "
                             "(or env.clue_shown=until_pivot; env.hidden_clues hides notes on purpose)")

    def check_splits(self, splits, key):
        if bad := [s for s in splits if s not in SPLITS]:
            raise ValueError(f"{key}: unknown credit split {bad[0]!r}: use {', '.join(SPLITS)}")

    def check_task_types(self, types, key):
        if bad := [t for t in types if t not in ("all", TASK_TYPE)]:
            raise ValueError(f"{key}: unknown credit task type {bad[0]!r}: use {TASK_TYPE} or all")

    def prepare_data(self, cfg):
        path, gen = cfg.data.path, cfg.data.generate
        knobs = game_knobs(cfg.env)
        if gen is not None and path and not os.path.isfile(os.path.join(path, "meta.json")):
            counts = {"train": gen.train, "valid": gen.valid}
            print(f"[generated games] writing credit games to {path} (seed {gen.seed}: {counts['train']} train, "
                  f"{counts['valid']} valid)")
            make_games(path, knobs, gen.seed, counts)
        try:
            made = read_meta(path)
        except FileNotFoundError as err:
            raise CreditDataError(str(err)) from None
        if made["knobs"] != asdict(knobs):
            differ = [f"{k}={made['knobs'].get(k)} (env.{k}={v})" for k, v in asdict(knobs).items() if made["knobs"].get(k) != v]
            raise CreditDataError(f"data.path={path} holds games made with {', '.join(differ)}: point data.path at "
                                  "games of these knobs, or leave it at its default (named after the knobs)")
        return path

    def load_split(self, cfg, data, split, types, limit=None):
        from stepopsd.envs.credit.env import load_tasks

        return load_tasks(data, split, limit=limit)

    def env_factory(self, cfg, service=None):
        from stepopsd.envs.credit.env import CreditEnv

        e = cfg.env
        return functools.partial(CreditEnv, weights=None if e.weights is None else list(e.weights),
                                 reward_noise=e.reward_noise, invalid_penalty=e.invalid_penalty,
                                 history_length=e.history_length, compact=e.compact, require_think=e.require_think,
                                 seed=cfg.seed)

    peer_lines = staticmethod(peer_lines)  # ALFWorld's: the valid actions, numbered by step

    def exact_credit(self, cfg):
        """The exact advantage of a step (credit.py) under the policy whose sampled actions at that state were
        `first_actions` (their shares estimate pi(right | s_k) and pi(invalid | s_k)), and whether it is a gate."""
        from stepopsd.envs.credit.env import trajectory_credit

        weights = None if cfg.env.weights is None else list(cfg.env.weights)
        penalty = cfg.env.invalid_penalty

        def credit(trajectory, step, first_actions):
            record = trajectory_credit(trajectory, weights, penalty=penalty)[step]
            n = max(len(first_actions), 1)
            p_right = sum(a == record.right for a in first_actions) / n if record.pivot >= 0 else 0.0
            return record.advantage(p_right, sum(a is None for a in first_actions) / n), record.pivot >= 0

        return credit

    def demonstrations(self, sft, path, workers, log):
        from stepopsd.envs.credit.demos import credit_demos
        from stepopsd.envs.credit.env import load_tasks

        tasks = load_tasks(sft.data, "train")
        log(f"[generated games] building the tiny policy: demonstrations from {len(tasks)} credit games x "
            f"{sft.episodes_per_game} episodes (epsilon {sft.demo_epsilon}, hindsight share {sft.hindsight_examples}), "
            "tokenizer, SFT")
        records = credit_demos(tasks, episodes=sft.episodes_per_game, epsilon=sft.demo_epsilon,
                               hindsight=sft.hindsight_examples, seed=sft.seed, compact=sft.compact,
                               history_length=sft.history_length)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return records, [], PEER_EXAMPLE, "generated"
