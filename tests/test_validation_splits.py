"""RolloutValidation over several splits: one rollout, counted per split and task type, metrics named
`<prefix>/<split>/success[_<type>]`, the first split's history is the run's metric, and checkpoints
(old ones too) restore the histories. A toy environment decides who wins by the task's split."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from stepopsd.callbacks.rollouts import RolloutValidation
from stepopsd.policy.backends.base import Generation
from stepopsd.policy.tokenizer import train_word_tokenizer
from stepopsd.rollout import RolloutConfig
from stepopsd.types import EnvState, Task, Transition


def task(split, kind, i):
    return Task(f"{split}/{kind}-x/trial_{i}", kind, "game", split, generated=True)


SPLITS = {"valid_seen": [task("valid_seen", "heat", 0), task("valid_seen", "heat", 1), task("valid_seen", "cool", 0)],
          "valid_unseen": [task("valid_unseen", "heat", 0), task("valid_unseen", "pick", 0)]}
WINS = {"valid_seen/heat-x/trial_0", "valid_seen/cool-x/trial_0", "valid_unseen/pick-x/trial_0"}


class WinByTaskEnv:
    """One step per episode; the games in WINS are won."""

    def reset(self, tasks, group_size):
        self.tasks = [t for t in tasks for _ in range(group_size)]
        self.live = list(range(len(self.tasks)))
        return [EnvState("goal", "obs", ("look",)) for _ in self.tasks]

    def live_slots(self):
        return list(self.live)

    def prompt(self, slot):
        return "look"

    def target_chars(self, response, mode):
        return None

    def step(self, responses):
        self.live = []
        out = {}
        for slot, text in responses.items():
            won = self.tasks[slot].task_id in WINS
            out[slot] = Transition(text, "look", True, 10.0 * won, EnvState("goal", "obs", ("look",), won=won, done=True, steps=1))
        return out


class Backend:
    def __init__(self, eos):
        self.eos = eos

    def generate(self, prompts, params, *, seed=None):
        return [Generation((self.eos,), (-0.1,), "stop") for _ in prompts]


class Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, metrics))


@pytest.fixture(scope="module")
def tok():
    return train_word_tokenizer(["look"])


def fake_trainer(tok):
    backend = Backend(tok.eos_token_id)
    dm = SimpleNamespace(env=WinByTaskEnv(), backend=backend, tokenizer=tok,
                         generation=lambda trainer: contextlib.nullcontext(backend))  # RolloutDataModule.generation
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t)
    precision = SimpleNamespace(forward_context=contextlib.nullcontext)  # 32-true: no autocast
    return SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, strategy=strategy, logger=Logger(),
                           precision_plugin=precision)


def test_splits_are_counted_and_named_separately(tok):
    validation = RolloutValidation(SPLITS, RolloutConfig(chat_template=False), every=1, samples=2)
    trainer = fake_trainer(tok)
    result = validation.evaluate(trainer, SimpleNamespace(device=torch.device("cpu")), 0)
    ((step, metrics),) = trainer.logger.rows
    assert step == 0 and metrics == pytest.approx({
        "val_generated/valid_seen/success": 2 / 3, "val_generated/valid_seen/success_heat": 0.5,
        "val_generated/valid_seen/success_cool": 1.0,
        "val_generated/valid_unseen/success": 0.5, "val_generated/valid_unseen/success_heat": 0.0,
        "val_generated/valid_unseen/success_pick": 1.0})  # no cool in valid_unseen, no pick in valid_seen
    assert result == pytest.approx(2 / 3) and validation.history == [(0, pytest.approx(2 / 3))]  # the first split
    assert validation.histories["valid_unseen"] == [(0, 0.5)]


def test_histories_survive_a_checkpoint_and_old_checkpoints_load(tok):
    validation = RolloutValidation(SPLITS, RolloutConfig(chat_template=False), every=1)
    validation.histories = {"valid_seen": [(0, 0.25), (5, 0.5)], "valid_unseen": [(0, 0.0), (5, 0.125)]}
    resumed = RolloutValidation(SPLITS, RolloutConfig(chat_template=False), every=1)
    resumed.load_state_dict(validation.state_dict())
    assert resumed.histories == validation.histories and resumed.history == [(0, 0.25), (5, 0.5)]
    old = RolloutValidation(SPLITS, RolloutConfig(chat_template=False), every=1)
    old.load_state_dict({"history": [[0, 0.25]]})  # written before validation had splits
    assert old.history == [(0, 0.25)] and old.histories["valid_unseen"] == []


def test_a_split_without_tasks_is_a_one_line_error():
    with pytest.raises(ValueError, match="valid_unseen") as e:
        RolloutValidation({"valid_seen": SPLITS["valid_seen"], "valid_unseen": []}, RolloutConfig(), every=1)
    assert "\n" not in str(e.value)
