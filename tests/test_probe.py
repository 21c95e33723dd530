"""The Monte-Carlo credit probe (stepopsd/probe.py): the pure parts by hand, the replay, and the probe's estimate
against the exact credit of the credit env under a policy whose action probabilities are known."""
import math
import random
import re

import pytest
import torch

from stepopsd.data.batch import build_batch
from stepopsd.envs.credit.env import CreditEnv, game_of_task, load_tasks, trajectory_credit
from stepopsd.envs.credit.game import GameKnobs, make_games
from stepopsd.estimators import Context, build_estimator
from stepopsd.policy.backends.base import Generation
from stepopsd.policy.tokenizer import train_word_tokenizer
from stepopsd.probe import (ProbeConfig, ReplayEnv, ReplayError, StepEstimate, agreement, mc_advantages, pick_steps,
                            probe, step_credit, summarise)
from stepopsd.rollout import RolloutConfig, rollout

from helpers.batches import batch_of


class UniformPolicy:
    """A generation backend that answers `<action>X</action>` with X drawn uniformly from the admissible actions its
    prompt lists (seeded per call): a policy whose probabilities are known exactly (p_right = 1 / choices)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, params, *, seed=None):
        rng = random.Random(seed)
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            listed = re.search(r"admissible actions now are: \[(.*)\]", text).group(1)
            action = rng.choice(re.findall(r"'([^']*)'", listed))
            new = self.tokenizer(f"<action>{action}</action>", add_special_tokens=False)["input_ids"]
            new = new + [self.tokenizer.eos_token_id]
            out.append(Generation(tuple(new), (0.0,) * len(new), "stop"))
        return out


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("credit")
    make_games(str(folder), GameKnobs(horizon=4, pivots=1, choices=3, delay=1), seed=3, counts={"train": 4, "valid": 4})
    tasks = load_tasks(str(folder), "valid")
    texts = []  # the env's words: goals, scenes, actions and the prompt's template at every turn
    for task in tasks:
        game = game_of_task(task)
        texts += [game.goal] + [f"{t.observation} " + " ".join(f"<action>{a}</action>" for a in t.admissible)
                                for t in game.turns]
        with CreditEnv() as env:
            env.reset([task], 1)
            for turn in game.turns:
                texts.append(env.prompt(0))
                env.step({0: f"<action>{turn.admissible[0]}</action>"})
    tokenizer = train_word_tokenizer(texts, vocab_size=2000)
    return tasks, tokenizer


def test_step_credit_is_the_mean_over_each_steps_target_tokens():
    """batch_of: trajectory m has rows_per_traj[m] rows of 4 tokens, loss on the last 2. Row 0 (traj 0, step 0):
    target on token 3 only (advantage 4) -> 4; row 1 (traj 0 step 1): no target -> mean over its loss tokens
    (1 + 3) / 2 = 2."""
    batch = batch_of([1.0, 0.0], [0, 0], rows_per_traj=(2, 1))
    batch.row_step = torch.tensor([0, 1, 0])
    batch.step_ids[0, 3] = 0
    adv = torch.tensor([[0.0, 0.0, 9.0, 4.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, -2.0, -2.0]])
    assert step_credit(adv, batch) == {(0, 0): 4.0, (0, 1): 2.0, (1, 0): -2.0}


def test_agreement_by_hand():
    """credit (1, 2, 3, -1), reference (0.5, 0.4, 2, -3): ranks (2, 3, 4, 1) and (3, 2, 4, 1): d^2 = 1 + 1 + 0 + 0,
    rho = 1 - 6 * 2 / (4 * 15) = 0.8. Signs agree on all four; decided (T, F, T, T): 3 of 3."""
    out = agreement([1, 2, 3, -1], [0.5, 0.4, 2, -3], [True, False, True, True])
    assert out["spearman"] == pytest.approx(0.8) and out["sign_agreement"] == 1.0 and out["decided_steps"] == 3
    out = agreement([1, -2, 0, 5], [1, 1, 1, 0])  # no `decided`: the non-zero references; credit 0 never agrees
    assert math.isnan(out["spearman"]) is False and out["sign_agreement"] == pytest.approx(1 / 3)
    assert out["decided_steps"] == 3
    assert math.isnan(agreement([1, 1, 1], [1, 2, 3])["spearman"])  # constant credit (GRPO in one trajectory)


def test_summarise_by_hand():
    """Two steps: A_MC 3 +- 1 (decided) and 0.5 +- 1 (not); exact 2 and 0 -> |z| 1 and 0.5, both within 2 SE.
    Credit (2, 2): pivotal share of |credit| with (True, False): 0.5."""
    est = [StepEstimate(0, 0, 4.0, 1.0, 1.0, ()), StepEstimate(0, 1, 1.0, 0.5, 1.0, ())]
    m = summarise(est, {"grpo": [2.0, 2.0]}, [2.0, 0.0], [True, False])
    assert m["probe/decided_frac"] == 0.5 and m["probe/mc_abs_mean"] == 1.75
    assert m["probe/mc_vs_exact_abs_z"] == 0.75 and m["probe/mc_within_2se_frac"] == 1.0
    assert m["probe/grpo/sign_agreement"] == 1.0 and m["probe/grpo/decided_steps"] == 1.0
    assert m["probe/grpo/pivotal_share"] == 0.5 and math.isnan(m["probe/grpo/spearman"])


def test_pick_steps_is_seeded_and_bounded(credit):
    tasks, tokenizer = credit
    with CreditEnv() as env:
        trajs, _ = rollout(env, UniformPolicy(tokenizer), tokenizer, tasks[:2], RolloutConfig(group_size=2, chat_template=False))
    picks = pick_steps(trajs, 5, seed=1)
    assert picks == pick_steps(trajs, 5, seed=1) and len(picks) == 5 and picks == sorted(set(picks))
    assert len(pick_steps(trajs, 100, seed=1)) == 4 * 4  # every step once when fewer than asked


def test_replay_reproduces_the_trajectory_and_refuses_a_different_one(credit):
    tasks, tokenizer = credit
    cfg = RolloutConfig(group_size=1, chat_template=False)
    with CreditEnv() as env:
        (traj,), _ = rollout(env, UniformPolicy(tokenizer), tokenizer, tasks[:1], cfg, seed=5)
        responses = [s.response for s in traj.steps]
        seen = [s.transition.state.observation for s in traj.steps]
        replay = ReplayEnv(env, [responses[:2]], [seen[:2]])
        states = replay.reset(tasks[:1], 1)
        assert states[0].observation == traj.steps[1].transition.state.observation == traj.steps[2].observation
        assert [t.reward for t in replay.replayed[0]] == [s.transition.reward for s in traj.steps[:2]]
        with pytest.raises(ReplayError, match="step 1: the environment answered"):
            ReplayEnv(env, [responses[:2]], [[seen[0], "another scene"]]).reset(tasks[:1], 1)


def test_the_probes_estimate_matches_the_exact_credit_within_its_standard_error(credit):
    """Under the uniform policy (p_right = 1/3, never invalid) the exact advantage at the gate is 10 (1[right] - 1/3)
    and 0 at every other turn. With M = 40 continuations each, A_MC must be within 3 SE of it on every probed step
    and within 2 SE on most; at the gate Q is exact (the outcome is decided) and V's SE is that of 40 Bernoulli(1/3)
    x 10 draws."""
    tasks, tokenizer = credit
    cfg = RolloutConfig(group_size=2, chat_template=False)
    policy = UniformPolicy(tokenizer)
    with CreditEnv() as env:
        trajs, _ = rollout(env, policy, tokenizer, tasks, cfg, seed=11)
        picks = pick_steps(trajs, 16, seed=2)
        estimates = mc_advantages(env, policy, tokenizer, trajs, picks, cfg, continuations=40, chunk=200, seed=4)
    exact = [trajectory_credit(trajs[e.traj])[e.step].advantage(p_right=1 / 3) for e in estimates]
    gates = [trajectory_credit(trajs[e.traj])[e.step].pivot >= 0 for e in estimates]
    assert any(gates) and not all(gates)
    z = [0.0 if x == e.advantage else abs(x - e.advantage) / e.se if e.se else math.inf for x, e in zip(exact, estimates)]
    assert all(v <= 3 for v in z), z
    assert sum(v <= 2 for v in z) >= 0.8 * len(z)
    for e, x, gate in zip(estimates, exact, gates):
        if gate:  # V at the gate: 40 draws of 10 * Bernoulli(1/3); Q decided by the action taken
            assert e.q == pytest.approx(x + 10 / 3) and 0.4 < e.se < 1.2 and len(e.first_actions) == 40


def test_probe_compares_every_estimator_with_the_monte_carlo_and_exact_credit(credit):
    """GRPO puts one value on every step of a trajectory: its sign agrees with the exact credit only on the gates'
    steps that decided the outcome, and its pivotal share is about the gates' share of steps (1 in 4); the metrics
    carry every estimator's keys."""
    tasks, tokenizer = credit
    cfg = RolloutConfig(group_size=4, chat_template=False)
    knobs = ProbeConfig(continuations=8, steps=12, tasks=4, seed=0)
    estimators = {"grpo": build_estimator({"name": "grpo"}), "rloo": build_estimator({"name": "rloo"})}

    def exact(trajectory, step, first):
        record = trajectory_credit(trajectory)[step]
        p_right = sum(a == record.right for a in first) / len(first) if record.pivot >= 0 else 0.0
        return record.advantage(p_right=p_right), record.pivot >= 0

    with CreditEnv() as env:
        result = probe(env, UniformPolicy(tokenizer), tokenizer, tasks, cfg, estimators, knobs, ctx=Context(step=0),
                       exact=exact)
    m = result.metrics
    assert m["probe/steps"] == 12 and len(result.credit["grpo"]) == 12 and len(result.exact) == 12
    for name in estimators:
        for key in ("spearman", "sign_agreement", "decided_steps", "exact_spearman", "exact_sign_agreement",
                    "pivotal_share"):
            assert f"probe/{name}/{key}" in m
    # the batch's own GRPO advantages, step by step, are what the probe reports as its credit
    batch, _ = build_batch(list(result.trajectories), pad_id=tokenizer.pad_token_id)
    per_step = step_credit(estimators["grpo"].advantages(batch, Context(step=0)).tokens, batch)
    assert result.credit["grpo"] == [per_step[e.traj, e.step] for e in result.estimates]
    assert m["time/probe_s"] > 0


def test_bad_probe_knobs_are_one_line():
    for knobs, expected in [({"continuations": 1}, "probe.continuations=1: need >= 2"),
                            ({"steps": 0}, "probe.steps=0: need an integer >= 1"),
                            ({"every": -1}, "probe.every=-1")]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            ProbeConfig(**knobs)


def test_the_oracle_puts_each_steps_exact_credit_on_its_tokens(credit):
    """Groups of 4 under the uniform policy: at a gate with r of the 4 members right, p_right = r / 4, so a right
    member's step gets 10 (1 - r/4) and a wrong one's -10 r/4; every other step 0 (no invalid steps)."""
    from stepopsd.envs.credit.spec import CreditSpec
    from stepopsd.estimators import Services
    from omegaconf import OmegaConf

    tasks, tokenizer = credit
    with CreditEnv() as env:
        trajs, _ = rollout(env, UniformPolicy(tokenizer), tokenizer, tasks, RolloutConfig(group_size=4, chat_template=False),
                           seed=3)
    batch, _ = build_batch(trajs, pad_id=tokenizer.pad_token_id)
    oracle = build_estimator({"name": "oracle"})
    cfg = OmegaConf.create({"env": {"weights": None, "invalid_penalty": 0.1}})
    oracle.setup(None, Services(exact_credit=CreditSpec().exact_credit(cfg)))
    out = oracle.advantages(batch, Context(step=0))
    checked = 0
    for r, (m, k) in enumerate(zip(batch.row_traj.tolist(), batch.row_step.tolist())):
        record = trajectory_credit(batch.trajectories[m])[k]
        if record.pivot >= 0:
            group = [t for t in batch.trajectories if t.group == batch.trajectories[m].group]
            right = sum(trajectory_credit(t)[k].hit for t in group)
            expected = 10 * (record.hit - right / 4)
            checked += 1
        else:
            expected = 0.0
        tokens = out.tokens[r][batch.loss_mask[r] > 0]
        assert torch.allclose(tokens, torch.full_like(tokens, expected), atol=1e-5), (m, k, tokens, expected)
    assert checked == len(trajs)  # one gate per trajectory
    with pytest.raises(ValueError, match="algorithm=oracle needs an environment"):
        build_estimator({"name": "oracle"}).setup(None, Services())


def test_the_oracle_is_refused_where_the_environment_has_no_exact_credit():
    from stepopsd.config import ConfigError, check_config

    from helpers.configs import heat_cpu_cfg

    with pytest.raises(ConfigError, match="algorithm=oracle needs each step's exact credit, which env=alfworld"):
        check_config(heat_cpu_cfg("algorithm=oracle"))


def test_the_probe_command_runs_on_alfworld_by_replay(generated_games, tmp_path_factory):
    """`python probe.py` end to end on the CPU ALFWorld job (tiny policy, 1 task x 2, 3 steps probed with 2
    continuations each, replayed in the engine): the table and probe.json with every probed step."""
    import json
    import subprocess
    import sys

    from helpers.runs import ROOT, tiny_overrides

    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # the other e2e tests' SFT, built once
    out = tmp_path_factory.mktemp("probe-cli")
    proc = subprocess.run([sys.executable, "probe.py", "experiment=alfworld_heat", "machine=cpu",
                           *tiny_overrides(str(generated_games[0]), cache, out), "probe.steps=3",
                           "probe.continuations=2", "probe.tasks=1", "probe.estimators=[grpo,gigpo]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[generated data] credit probe: 3 steps" in proc.stdout and "| gigpo |" in proc.stdout
    saved = json.loads((out / "probe.json").read_text())
    assert saved["data"] == "generated" and len(saved["steps"]) == 3
    assert set(saved["steps"][0]["credit"]) == {"grpo", "gigpo"} and "probe/grpo/spearman" in saved["metrics"]
    bad = subprocess.run([sys.executable, "probe.py", "experiment=alfworld_heat", "machine=cpu",
                          "probe.estimators=[grpo,nope]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
