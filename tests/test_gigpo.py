"""GiGPO (stepopsd/estimators/gigpo.py): A = A^E + omega * A^S, numbers by hand.

Worked example (one episode group of 3 trajectories, gamma = 0.95, ALFWorld rewards, no invalid steps):

    traj  anchors      step rewards  R    R^S_t = r_t + gamma R^S_{t+1}
    t1    s0, s1, s2   0, 0, 10      10   0.95^2 * 10 = 9.025, 0.95 * 10 = 9.5, 10
    t2    s0, s3       0, 10         10   9.5, 10
    t3    s0, s1       0, 0          0    0, 0

Episode level, `trajectory` stats (paper Eq. 3): values (10, 10, 0), mean 20/3 = 6.6667, deviations (10/3, 10/3, -20/3),
  unbiased var (100 + 100 + 400) / 9 / 2 = 33.333, std 5.7735
  mean_norm: +3.3333, +3.3333, -6.6667      mean_std_norm: (10/3) / 5.7735 = +0.57735, -1.15470
Episode level, `steps` stats (verl-agent's cross-steps): the rows' values (10, 10, 10, 10, 10, 0, 0),
  mean 50/7 = 7.1429, unbiased var (5 * (20/7)^2 + 2 * (50/7)^2) / 6 = 23.810, std 4.8795
  mean_norm: +2.8571, -7.1429               mean_std_norm: (20/7) / 4.8795 = +0.58554, -1.46385
Step level (anchor groups within the episode group):
  s0 {t1: 9.025, t2: 9.5, t3: 0}: mean 6.175, deviations (2.85, 3.325, -6.175), var (8.1225 + 11.055625 + 38.130625) / 2
     = 28.654375, std 5.35298 -> mean_norm (2.85, 3.325, -6.175), mean_std_norm (0.53241, 0.62115, -1.15356)
  s1 {t1: 9.5, t3: 0}: mean 4.75, std 6.71751 -> mean_norm (4.75, -4.75), mean_std_norm (+0.70711, -0.70711)
  s2, s3: one step each -> 0
  anchor groups of sizes 3, 2, 1, 1: mean size 7/4 = 1.75, rows in groups of >= 2: 5 of 7.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from stepopsd.config import ConfigError, check_config
from stepopsd.data.batch import build_batch
from stepopsd.estimators import Context, Services, build_estimator, per_token
from stepopsd.estimators.gigpo import (GiGPO, GiGPOKnobs, anchor_groups, discounted_returns, episode_advantages,
                                       step_advantages)
from stepopsd.types import EnvState, StepRecord, Task, Trajectory, Transition

from helpers.batches import batch_of
from helpers.configs import heat_cpu_cfg
from helpers.runs import run_train, tiny_overrides, train_rows

TASK = Task("train/heat-egg/trial_0", "heat", "games/heat-egg/game.tw-pddl", "train", generated=True)


def step(obs: str, reward: float, *, response: int = 2, won: bool = False) -> StepRecord:
    """A step that acted on observation `obs` and earned `reward`; `response` tokens on the loss mask (0: none)."""
    state = EnvState("heat an egg", "after", (), won=won, done=won)
    tr = Transition("x", "look" if reward > -0.1 else None, reward > -0.1, reward, state)
    return StepRecord((1, 2, 3), tuple(range(5, 5 + response)), (-0.5,) * response, "x", None, tr, observation=obs)


def traj(group: int, member: int, *steps: tuple) -> Trajectory:
    """steps: (observation, reward) or (observation, reward, response tokens); the last won if its reward is 10."""
    recs = tuple(step(s[0], s[1], response=s[2] if len(s) > 2 else 2, won=s[1] >= 10) for s in steps)
    return Trajectory(TASK, group, member, recs)


def batch_of_trajs(*trajs):
    return build_batch(list(trajs), pad_id=0)[0]


WORKED = [traj(0, 0, ("s0", 0.0), ("s1", 0.0), ("s2", 10.0)), traj(0, 1, ("s0", 0.0), ("s3", 10.0)),
          traj(0, 2, ("s0", 0.0), ("s1", 0.0))]
A = 10 / 3 / math.sqrt(100 / 3)  # 0.57735
B = 20 / 7 / math.sqrt((5 * (20 / 7) ** 2 + 2 * (50 / 7) ** 2) / 6)  # 0.58554
S0 = math.sqrt(28.654375)  # 5.35298
S1 = math.sqrt(9.5 ** 2 / 2)  # 6.71751
# per episode_stats and mode: A^E per trajectory, A^S per row (rows: t1 s0 s1 s2, t2 s0 s3, t3 s0 s1)
EPISODE = {("trajectory", "mean_norm"): [10 / 3, 10 / 3, -20 / 3], ("trajectory", "mean_std_norm"): [A, A, -2 * A],
           ("steps", "mean_norm"): [20 / 7, 20 / 7, -50 / 7], ("steps", "mean_std_norm"): [B, B, -B * 50 / 20]}
STEP = {"mean_norm": [2.85, 4.75, 0.0, 3.325, 0.0, -6.175, -4.75],
        "mean_std_norm": [2.85 / S0, 4.75 / S1, 0.0, 3.325 / S0, 0.0, -6.175 / S0, -4.75 / S1]}
ROW_TRAJ = [0, 0, 0, 1, 1, 2, 2]


def close(got, expect, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.tensor(expect, dtype=torch.float64),
                               atol=tol, rtol=0)


def test_discounted_returns_by_hand():
    assert discounted_returns([[0, 0, 10], [0, 10], [0, 0]], 0.95) == [[0.95 * 9.5, 9.5, 10.0], [9.5, 10.0], [0.0, 0.0]]
    assert discounted_returns([[1, -0.1, 10]], 0.0) == [[1.0, -0.1, 10.0]]  # gamma 0: each step's own reward
    assert discounted_returns([[1, 2, 3], []], 1.0) == [[6.0, 5.0, 3.0], []]  # gamma 1: the rest of the episode
    with pytest.raises(ValueError, match="gamma=1.5"):
        discounted_returns([[1.0]], 1.5)


@pytest.mark.parametrize("stats, mode", list(EPISODE))
def test_episode_advantages_of_the_worked_example(stats, mode):
    counts = torch.tensor([3, 2, 2]) if stats == "steps" else None  # steps per trajectory
    close(episode_advantages(torch.tensor([10.0, 10.0, 0.0]), torch.tensor([4, 4, 4]), mode, counts=counts),
          EPISODE[stats, mode])


def test_episode_advantages_groups_of_one_uniform_groups_and_ids():
    rewards, groups = torch.tensor([10.0, 3.0, 0.0, 2.0, 2.0, -0.1]), torch.tensor([7, 9, 7, 5, 5, 1])
    # group 7 (10, 0): mean 5, std sqrt(50) -> +-0.70711 | +-5; groups 9 and 1 are alone: mean 0, std 1 -> A^E = R;
    # group 5 (2, 2) is uniform -> 0 in both modes
    a = 5 / math.sqrt(50)
    close(episode_advantages(rewards, groups, "mean_std_norm"), [a, 3.0, -a, 0.0, 0.0, -0.1])
    close(episode_advantages(rewards, groups, "mean_norm"), [5.0, 3.0, -5.0, 0.0, 0.0, -0.1])
    # `steps` stats: a lone trajectory of 3 rows has three equal values: mean R, std 0 -> 0 (the reference does so)
    close(episode_advantages(torch.tensor([4.0]), torch.tensor([0]), counts=torch.tensor([3])), [0.0])
    close(episode_advantages(torch.tensor([4.0]), torch.tensor([0]), counts=torch.tensor([1])), [4.0])
    assert episode_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).dtype == torch.float32  # integer rewards
    with pytest.raises(ValueError, match=r"\[M\]"):
        episode_advantages(rewards, groups[:3])
    with pytest.raises(ValueError, match="mode='std'"):
        episode_advantages(rewards, groups, "std")


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
def test_step_advantages_of_the_worked_example(mode):
    returns = torch.tensor([9.025, 9.5, 10.0, 9.5, 10.0, 0.0, 0.0])
    anchors = ["s0", "s1", "s2", "s0", "s3", "s0", "s1"]
    close(step_advantages(returns, torch.zeros(7, dtype=torch.long), anchors, mode), STEP[mode])
    # the same observation in another episode group is another anchor group: here each alone -> 0
    close(step_advantages(returns, torch.arange(7), anchors, mode), [0.0] * 7)
    index, sizes = anchor_groups(torch.zeros(7, dtype=torch.long), anchors)
    assert index.tolist() == [0, 1, 2, 0, 3, 0, 1] and sizes.tolist() == [3, 2, 1, 1]


@pytest.mark.parametrize("stats, mode", list(EPISODE))
def test_the_estimator_on_the_worked_example(stats, mode):
    batch = batch_of_trajs(*WORKED)
    assert batch.row_traj.tolist() == ROW_TRAJ and batch.row_step.tolist() == [0, 1, 2, 0, 1, 0, 1]
    out = build_estimator({"name": "gigpo", "gigpo": {"mode": mode, "episode_stats": stats}}).advantages(batch, Context(step=0))
    close(out.trajectories, EPISODE[stats, mode])
    rows = [EPISODE[stats, mode][m] + s for m, s in zip(ROW_TRAJ, STEP[mode])]  # omega = 1
    torch.testing.assert_close(out.tokens, torch.tensor(rows)[:, None] * batch.loss_mask, atol=1e-5, rtol=0)
    assert out.tokens.dtype == torch.float32 and out.tokens.shape == batch.loss_mask.shape
    m = out.metrics
    assert m["gigpo/anchor_group_frac"] == pytest.approx(5 / 7) and m["gigpo/mean_anchor_group_size"] == 1.75
    assert m["gigpo/step_adv_abs_mean"] == pytest.approx(sum(map(abs, STEP[mode])) / 7, abs=1e-6)
    if (stats, mode) == ("steps", "mean_std_norm"):  # the research notes' final A (verl-agent's code, omega 1)
        close(out.tokens[:, -1], [1.1179, 1.2926, 0.5855, 1.2066, 0.5855, -2.6174, -2.1709], tol=1e-4)


def test_anchors_shared_across_trajectories_and_revisited_within_one():
    """Group 0: t1 visits a, b, a (an invalid step in b costs 0.1) and wins; t2 visits a, b and loses.
    gamma 0.5: t1 rewards (0, -0.1, 10) -> R^S (0 + 0.5 * (-0.1 + 0.5 * 10), -0.1 + 5, 10) = (2.45, 4.9, 10);
    t2 rewards (0, 0) -> (0, 0). R = 9.9 and 0.
    Anchor a holds t1 steps 0 and 2 and t2 step 0: {2.45, 10, 0}, mean 4.15, mean_norm (-1.7, 5.85, -4.15);
    anchor b holds t1 step 1 and t2 step 1: {4.9, 0}, mean 2.45, mean_norm (2.45, -2.45).
    A^E (mean_norm): 9.9 - 4.95 = +4.95, -4.95. omega 0.5: rows t1 (4.95 - 0.85, 4.95 + 1.225, 4.95 + 2.925),
    t2 (-4.95 - 2.075, -4.95 - 1.225). Group 1 (same observation strings, its own groups): t3 a (0) and t4 a, a (0, 0):
    R = 0, 0 -> A^E 0; anchor a {0, 0, 0} -> 0."""
    batch = batch_of_trajs(traj(0, 0, ("a", 0.0), ("b", -0.1), ("a", 10.0)), traj(0, 1, ("a", 0.0), ("b", 0.0)),
                           traj(1, 0, ("a", 0.0)), traj(1, 1, ("a", 0.0), ("a", 0.0)))
    est = build_estimator({"name": "gigpo", "gigpo": {"gamma": 0.5, "step_advantage_w": 0.5, "mode": "mean_norm"}})
    out = est.advantages(batch, Context(step=0))
    close(out.trajectories, [4.95, -4.95, 0.0, 0.0])
    close(out.tokens[:, -1], [4.1, 6.175, 7.875, -7.025, -6.175, 0.0, 0.0, 0.0])
    # anchor groups: (0, a) 3 rows, (0, b) 2, (1, a) 3: every row shares its anchor
    assert out.metrics["gigpo/anchor_group_frac"] == 1.0 and out.metrics["gigpo/mean_anchor_group_size"] == 8 / 3


def test_gamma_zero_compares_each_steps_own_reward():
    """gamma 0: R^S = r_t. Group: t1 (s0: 0, s1: 10), t2 (s0: 0, s1: 0). Anchor s0 {0, 0} -> 0; anchor s1 {10, 0}:
    mean_norm +-5. A^E mean_norm +-5. Rows: t1 (5 + 0, 5 + 5), t2 (-5 + 0, -5 - 5)."""
    batch = batch_of_trajs(traj(0, 0, ("s0", 0.0), ("s1", 10.0)), traj(0, 1, ("s0", 0.0), ("s1", 0.0)))
    out = build_estimator({"name": "gigpo", "gigpo": {"gamma": 0.0, "mode": "mean_norm"}}).advantages(batch, Context(step=0))
    close(out.tokens[:, -1], [5.0, 10.0, -5.0, -10.0])
    # gamma 0.95 would credit t1's first step too: s0 {9.5, 0} -> +4.75 and t1 row 0 is 5 + 4.75
    out = build_estimator({"name": "gigpo", "gigpo": {"gamma": 0.95, "mode": "mean_norm"}}).advantages(batch, Context(step=0))
    close(out.tokens[:, -1], [9.75, 10.0, -9.75, -10.0])


@pytest.mark.parametrize("stats", ["trajectory", "steps"])
def test_omega_zero_is_exactly_the_episode_advantage(stats):
    batch = batch_of_trajs(*WORKED)
    out = build_estimator({"name": "gigpo", "gigpo": {"step_advantage_w": 0.0, "episode_stats": stats}}).advantages(batch,
                                                                                                        Context(step=0))
    assert torch.equal(out.tokens, per_token(out.trajectories, batch))
    if stats == "trajectory":  # the paper's Eq. 3 is GRPO's Eq. 1 (unbiased std, eps 1e-6)
        grpo = build_estimator({"name": "grpo"}).advantages(batch, Context(step=0))
        torch.testing.assert_close(out.tokens, grpo.tokens, atol=1e-6, rtol=0)


def test_similarity_anchors_cluster_greedily_against_each_clusters_first_member():
    """difflib ratio = 2 M / (|a| + |b|), M the matched characters. "abcd" vs "abce": M = 3 -> 6/8 = 0.75;
    "xbce" vs "abcd": M = 2 ("bc") -> 0.5; "xbce" vs "abce": 0.75; "abcd" vs "wxyz": 0.
    At 0.7 rows (abcd, abce, xbce, abcd) give clusters {abcd, abce, abcd} and {xbce}: "xbce" is compared with the
    cluster's representative "abcd" (0.5), not with "abce" (0.75), as the reference's enable_similarity does.
    At 0.8 (and at 1.0, exact) every distinct string is its own cluster."""
    groups = torch.zeros(4, dtype=torch.long)
    keys = ["abcd", "abce", "xbce", "abcd"]
    index, sizes = anchor_groups(groups, keys, 0.7)
    assert index.tolist() == [0, 0, 1, 0] and sizes.tolist() == [3, 1]
    for exact in (0.8, 1.0):
        index, sizes = anchor_groups(groups, keys, exact)
        assert index.tolist() == [0, 1, 2, 0] and sizes.tolist() == [2, 1, 1]
    # another episode group never joins: (abcd in group 1) is its own cluster
    index, _ = anchor_groups(torch.tensor([0, 0, 1]), ["abcd", "abce", "abcd"], 0.7)
    assert index.tolist() == [0, 0, 1]
    # A^S over the 0.7 clusters, mean_norm: returns (1, 2, 5, 3) -> cluster {1, 2, 3} mean 2: (-1, 0, -, +1); xbce alone 0
    close(step_advantages(torch.tensor([1.0, 2.0, 5.0, 3.0]), groups, keys, "mean_norm", similarity=0.7),
          [-1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="text observations"):
        anchor_groups(torch.zeros(2, dtype=torch.long), [("a",), ("a",)], 0.9)


def test_the_similarity_is_the_environments_unless_gigpo_sets_its_own():
    est = build_estimator({"name": "gigpo"})
    est.setup(None, Services(anchor_similarity=0.9))
    assert est.similarity == 0.9
    est = build_estimator({"name": "gigpo", "gigpo": {"similarity_thresh": 1.0}})
    est.setup(None, Services(anchor_similarity=0.9))
    assert est.similarity == 1.0
    with pytest.raises(ValueError, match="env.anchor_similarity=0"):
        build_estimator({"name": "gigpo"}).setup(None, Services(anchor_similarity=0))
    # the protocols: ALFWorld's text observations repeat exactly; Search-QA's passages are clustered at 0.9
    assert heat_cpu_cfg("algorithm=gigpo").env.anchor_similarity == 1.0
    assert heat_cpu_cfg("experiment=searchqa", "algorithm=gigpo").env.anchor_similarity == 0.9


def test_gigpos_knobs_reach_it_as_another_estimators_base():
    """algorithm.gigpo.* is the same node under algorithm=gigpo and under StepOPSD / RLSD / SDAR with base=gigpo."""
    for name in ("stepopsd", "rlsd", "sdar"):
        _, est, _ = check_config(heat_cpu_cfg(f"algorithm={name}", "algorithm.base=gigpo", "algorithm.gigpo.gamma=0.5",
                                              "algorithm.gigpo.mode=mean_norm"))
        assert isinstance(est.base, GiGPO) and (est.base.knobs.gamma, est.base.knobs.mode) == (0.5, "mean_norm")
    with pytest.raises(ConfigError, match="algorithm.gigpo.gamma=2.0"):
        check_config(heat_cpu_cfg("algorithm=stepopsd", "algorithm.base=gigpo", "algorithm.gigpo.gamma=2"))


def test_as_stepopsds_base_with_lambda_zero_it_is_gigpo_with_its_defaults():
    knobs = {"alpha_clip": 0.2, "lam0": 0.0, "decay_steps": 50, "weight_fn": "sigmoid", "budget_clip": 2.0,
             "teacher_refresh": 10, "target_span": "action_only", "peer_budget_tokens": 512}
    est = build_estimator({"name": "stepopsd", "base": "gigpo", "stepopsd": knobs})
    est.setup(torch.nn.Linear(2, 2), Services(tokenizer=SimpleNamespace(pad_token_id=0)))  # lambda 0: no teacher pass
    batch = batch_of_trajs(*WORKED)
    out = est.advantages(batch, Context(step=0, policy=torch.nn.Linear(2, 2)))
    assert torch.equal(out.tokens, build_estimator({"name": "gigpo"}).advantages(batch, Context(step=0)).tokens)


def test_a_row_without_action_tokens_gets_no_advantage_but_still_counts():
    """t1's second step produced no response tokens (empty loss mask). Rewards: t1 (s0: 0, s1: 10 with no tokens),
    t2 (s0: 0, s1: 0); gamma 0, mean_norm: rows t1 (5 + 0, nothing), t2 (-5 + 0, -5 - 5): t2's step on s1 is still
    compared with t1's (mean 5)."""
    batch = batch_of_trajs(traj(0, 0, ("s0", 0.0), ("s1", 10.0, 0)), traj(0, 1, ("s0", 0.0), ("s1", 0.0)))
    assert batch.loss_mask[1].sum() == 0
    out = build_estimator({"name": "gigpo", "gigpo": {"gamma": 0.0, "mode": "mean_norm"}}).advantages(batch, Context(step=0))
    assert torch.all(out.tokens[1] == 0) and torch.all(out.tokens[~batch.loss_mask.bool()] == 0)
    close(out.tokens.sum(1) / batch.loss_mask.sum(1).clamp(min=1), [5.0, 0.0, -5.0, -10.0])


def test_a_batch_without_its_trajectory_records_is_refused():
    with pytest.raises(ValueError, match="trajectory records"):
        build_estimator({"name": "gigpo"}).advantages(batch_of([1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1]), Context(step=0))


@pytest.mark.parametrize("knobs, expected", [
    ({"gamma": 1.5}, "algorithm.gigpo.gamma=1.5: the discount must be in [0, 1]"),
    ({"gamma": -0.1}, "algorithm.gigpo.gamma=-0.1"),
    ({"gamma": "high"}, "algorithm.gigpo.gamma='high': need a finite number"),
    ({"step_advantage_w": -1.0}, "algorithm.gigpo.step_advantage_w=-1.0: the step-advantage weight must be >= 0"),
    ({"step_advantage_w": float("nan")}, "algorithm.gigpo.step_advantage_w=nan"),
    ({"mode": "std_norm"}, "algorithm.gigpo.mode='std_norm': choose one of mean_std_norm, mean_norm"),
    ({"episode_stats": "rows"}, "algorithm.gigpo.episode_stats='rows': choose one of trajectory, steps"),
    ({"similarity_thresh": 0.0}, "algorithm.gigpo.similarity_thresh=0.0: need a similarity ratio in (0, 1]"),
    ({"similarity_thresh": 1.5}, "algorithm.gigpo.similarity_thresh=1.5"),
])
def test_invalid_knobs_are_one_line_value_errors(knobs, expected):
    with pytest.raises(ValueError) as e:
        build_estimator({"name": "gigpo", "gigpo": knobs})
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_defaults_and_algorithm_gigpo_composes():
    est = build_estimator({"name": "gigpo"})  # knobs absent (another estimator's base): the schema's defaults
    assert est.knobs == GiGPOKnobs(0.95, 1.0, "mean_std_norm", "trajectory", None) and est.similarity == 1.0
    cfg = heat_cpu_cfg("algorithm=gigpo")
    assert cfg.algorithm.name == "gigpo" and cfg.algorithm.gigpo.gamma == GiGPOKnobs.gamma
    _, est, _ = check_config(cfg)
    assert isinstance(est, GiGPO) and est.knobs.mode == "mean_std_norm"
    _, est, _ = check_config(heat_cpu_cfg("algorithm=gigpo", "algorithm.gigpo.mode=mean_norm",
                                          "algorithm.gigpo.episode_stats=steps"))
    assert (est.knobs.mode, est.knobs.episode_stats) == ("mean_norm", "steps")
    with pytest.raises(ConfigError, match="algorithm.gigpo.gamma=2.0") as e:
        check_config(heat_cpu_cfg("algorithm=gigpo", "algorithm.gigpo.gamma=2"))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


def test_train_runs_two_steps_with_gigpo(games, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # shared: the SFT warm start is built once
    out = tmp_path_factory.mktemp("run-gigpo")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", "algorithm=gigpo", *tiny_overrides(games, cache, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, steps = train_rows(out)
    assert len(steps) == 2
    for r in steps:  # both members of the group start from the same observation: step 0 is always shared
        assert 0 < float(r["gigpo/anchor_group_frac"]) <= 1 and float(r["gigpo/mean_anchor_group_size"]) >= 1
        assert math.isfinite(float(r["gigpo/step_adv_abs_mean"])) and math.isfinite(float(r["actor/pg_loss"]))
