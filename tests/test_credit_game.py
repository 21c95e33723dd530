"""The credit env's games and exact credit (stepopsd/envs/credit/): numbers worked out by hand, the expert, the knob
errors, determinism and the snapshot; the probe's use of it is tests/test_probe.py."""
import random
import re

import pytest

from stepopsd.envs.credit.credit import (CreditState, advance, credit_records, exact_advantage, gate_weights, outcome,
                                         reward_noise, start, step_reward)
from stepopsd.envs.credit.env import CreditEnv, load_tasks
from stepopsd.envs.credit.game import GameKnobs, expert_action, game_rng, make_game, make_games


def game(**knobs):
    return make_game(GameKnobs(**knobs), game_rng(0, "train", 0))


def test_the_gates_sit_where_the_knobs_put_them():
    """early: gates on turns delay+1 .. delay+k (0-based delay .. delay+k-1); spread over H = 7 with k = 3, delay 1:
    from turn 1 to turn 6, evenly: 1, 1 + round(5/2) = 3 (round half to even: 2.5 -> 2, so 3), 6."""
    assert game(horizon=6, pivots=1, delay=1).gates == (1,)
    assert game(horizon=6, pivots=2, delay=2, placement="early").gates == (2, 3)
    assert game(horizon=7, pivots=3, delay=1, placement="spread").gates == (1, 3, 6)
    g = game(horizon=6, pivots=1, choices=3, delay=1)
    gate = g.turns[g.gates[0]]
    assert len(gate.admissible) == 3 and gate.right in gate.admissible
    assert all(len(t.admissible) == 3 for t in g.turns)


def test_exact_credit_by_hand():
    """Weights (6, 4) over two gates; p_right = 0.25 at gate 0: right -> 6 (1 - 0.25) = 4.5, wrong -> -1.5;
    a distractor: 0; an invalid step (p_invalid 0.5) at a distractor: -0.1 (1 - 0.5) = -0.05, and a valid one there
    +0.05; at gate 1 with p_right 0.5 a right action: 4 (1 - 0.5) = 2."""
    g = game(horizon=6, pivots=2, choices=4, delay=1, placement="early")
    s0 = start(g, (6.0, 4.0))
    s = advance(s0, expert_action(g.turns[0]))  # turn 0: a distractor
    gate0 = g.turns[1]
    wrong = next(a for a in gate0.admissible if a != gate0.right)
    assert exact_advantage(s, gate0.right, 0.25) == pytest.approx(4.5)
    assert exact_advantage(s, wrong, 0.25) == pytest.approx(-1.5)
    assert exact_advantage(s0, "look at anything", 0.25) == 0.0
    assert exact_advantage(s0, None, 0.0, 0.5) == pytest.approx(-0.05)
    assert exact_advantage(s0, g.turns[0].admissible[0], 0.0, 0.5) == pytest.approx(0.05)
    s = advance(s, gate0.right)
    assert exact_advantage(s, g.turns[2].right, 0.5) == pytest.approx(2.0)
    records = credit_records(g, [g.turns[0].admissible[0], gate0.right, g.turns[2].right, None,
                                 g.turns[4].admissible[0], g.turns[5].admissible[0]], (6.0, 4.0))
    assert [r.pivot for r in records] == [-1, 0, 1, -1, -1, -1]
    assert [r.advantage(0.25) for r in records[:3]] == pytest.approx([0.0, 4.5, 3.0])
    assert records[3].advantage() == pytest.approx(-0.1)  # invalid at a distractor, p_invalid 0


def test_the_outcome_is_additive_and_comes_at_the_end():
    """Two gates of weight 5 (10 / 2): gate 0 right, gate 1 wrong -> R = 5, paid on the last step only; an invalid
    step costs 0.1 on its own step."""
    g = game(horizon=4, pivots=2, choices=3, delay=1, placement="early")
    assert gate_weights(None, 2) == (5.0, 5.0)
    s = start(g)
    rewards = []
    for t, turn in enumerate(g.turns):
        action = turn.right if t == 1 else (next(a for a in turn.admissible if a != turn.right) if t == 2 else None)
        s = advance(s, action)
        rewards.append(step_reward(s, action is not None))
    assert s.done and outcome(s) == 5.0 and not s.won
    assert rewards == pytest.approx([-0.1, 0.0, 0.0, 5.0 - 0.1])


def test_the_expert_always_wins_without_noise():
    for i in range(20):
        g = make_game(GameKnobs(horizon=7, pivots=3, choices=4, delay=1, placement="random"), game_rng(1, "train", i))
        s = start(g)
        for turn in g.turns:
            s = advance(s, expert_action(turn))
        assert s.won and outcome(s) == pytest.approx(10.0)


def test_reward_noise_is_a_function_of_the_episode():
    g = game(horizon=3, pivots=1, choices=2, delay=1)
    a = start(g, key="0/train/00000/0")
    for turn in g.turns:
        a = advance(a, turn.right)
    b = CreditState(a.game, a.weights, a.actions, a.key)
    assert reward_noise(a, 1.0) == reward_noise(b, 1.0) != 0.0 and reward_noise(a, 0.0) == 0.0
    other = CreditState(a.game, a.weights, a.actions, "0/train/00000/1")
    assert reward_noise(other, 1.0) != reward_noise(a, 1.0)


@pytest.mark.parametrize("knobs, words", [
    ({"horizon": 0}, "env.horizon=0"), ({"pivots": 0}, "env.pivots=0"), ({"delay": -1}, "env.delay=-1"),
    ({"horizon": 2, "pivots": 2, "delay": 1}, "need env.horizon >= 3"), ({"choices": 1}, "env.choices=1"),
    ({"placement": "late"}, "env.placement=late"), ({"clue_shown": "always"}, "env.clue_shown=always"),
    ({"hidden_clues": 1.5}, "env.hidden_clues=1.5")])
def test_bad_game_knobs_are_one_line(knobs, words):
    with pytest.raises(ValueError) as e:
        GameKnobs(**knobs)
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape("give 1 positive weights")):
        gate_weights([1.0, 2.0], 1)


def test_games_are_deterministic_per_seed_and_labelled_generated(tmp_path):
    knobs = GameKnobs(horizon=5, pivots=2, choices=3, delay=1, placement="random")
    make_games(str(tmp_path / "a"), knobs, 7, {"train": 3, "valid": 2})
    make_games(str(tmp_path / "b"), knobs, 7, {"train": 3, "valid": 2})
    make_games(str(tmp_path / "c"), knobs, 8, {"train": 3, "valid": 2})
    read = lambda d: (tmp_path / d / "train.jsonl").read_text()
    assert read("a") == read("b") != read("c")
    tasks = load_tasks(str(tmp_path / "a"), "valid")
    assert len(tasks) == 2 and all(t.generated and t.data_label == "generated" for t in tasks)


def test_a_snapshot_restores_every_slot(tmp_path):
    make_games(str(tmp_path), GameKnobs(horizon=4, pivots=1, choices=3, delay=1), 0, {"train": 2, "valid": 2})
    tasks = load_tasks(str(tmp_path), "train")
    rng = random.Random(0)
    with CreditEnv(reward_noise=1.0) as env:
        env.reset(tasks, 2)
        env.step({s: f"<action>{env.states[s].admissible[0]}</action>" for s in env.live_slots()})
        snap = env.snapshot()
        actions = [{s: f"<action>{rng.choice(env.states[s].admissible)}</action>" for s in env.live_slots()}
                   for _ in range(3)]
        first = [env.step(a) for a in actions]
        env.restore(snap)
        again = [env.step(a) for a in actions]
    assert [[(t.reward, t.state) for t in step.values()] for step in first] == \
           [[(t.reward, t.state) for t in step.values()] for step in again]
