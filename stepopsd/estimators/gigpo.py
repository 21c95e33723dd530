"""GiGPO: Group-in-Group Policy Optimization (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent
Training", arXiv 2505.10978; reference code langfengQ/verl-agent `gigpo/core_gigpo.py`). Written from the paper's
equations and the reference's documented behaviour, not from its code.

Two nested groupings give every step row an advantage, critic-free:

  episode level (paper Eq. 3), per trajectory i of episode group g (`batch.traj_group`), outcome reward R_i
  (`batch.traj_reward`):
      mean_std_norm   A^E_i = (R_i - mean_g R) / (std_g R + eps)
      mean_norm       A^E_i =  R_i - mean_g R
  std is the unbiased (n - 1) standard deviation, eps = 1e-6 (added to std, not under a root). A group with fewer
  than two values takes mean 0 and std 1, so A^E = R_i (the reference's rule; `build_batch` already drops groups
  left with fewer than two members, the pure function still defines it). All rewards of a group equal: A^E = 0.

  step level (paper Eq. 5-7): discounted step returns from the per-step env rewards r_{i,k}
  (`StepRecord.transition.reward`),
      R^S_{i,t} = sum_{k >= t} gamma^{k - t} r_{i,k},
  and anchor-state groups: within one episode group, every step (of any trajectory, at any timestep) whose anchor
  key is identical forms one group, so a state visited by several trajectories, or revisited within one, is a group.
      mean_std_norm   A^S_{i,t} = (R^S_{i,t} - mean_a R^S) / (std_a R^S + eps)
      mean_norm       A^S_{i,t} =  R^S_{i,t} - mean_a R^S
  An anchor group of one step has nothing to compare with: A^S = 0.

  combined (paper Eq. 8): A_{i,t} = A^E_i + omega * A^S_{i,t} on every loss-mask token of the row of step t of
  trajectory i (0 off the mask; a row with an empty loss mask carries nothing but still counts in its groups'
  statistics: the step was taken).

The anchor key is `StepRecord.observation`, the environment's observation the step acted on as the env spec defines
it (`EnvState.observation`), compared by exact string equality (the reference's default) or, with a similarity
below 1, clustered by difflib ratio (the reference's `enable_similarity`, `anchor_groups`).
  ALFWorld   the engine's text observation of the current state (the room description after reset, then the
             feedback of the last command), without the admissible commands, the history or the prompt template,
             as the reference's `text_obs`. Steps of a group share the reset observation, and revisited rooms
             repeat; every step after an invalid action (or a command the engine cannot run) sees "Nothing
             happens." and those steps share one anchor whatever the room, as in the reference.
  Search-QA  the question is the goal, not the observation: the first step's observation is "" for every member
             (one anchor group: the question), later steps' is the `<information>` passages the last search
             retrieved, which repeat exactly only when two members' searches returned the same passages, and steps
             after an invalid action share the env's invalid-action message. By exact matching most anchor groups
             beyond the first step would be singletons (A^S = 0), so the Search-QA env's `anchor_similarity` is 0.9,
             the reference Search script's clustering (`gigpo/anchor_group_frac` shows how much step-level signal
             a run gets).

Knobs (`algorithm.gigpo.*`, `GiGPOKnobs`; the same node under any estimator whose `algorithm.base` is gigpo),
defaults from verl-agent's ALFWorld GiGPO script:
  gamma = 0.95              discount of the step returns (the reference yaml's own default is 1.0)
  step_advantage_w = 1.0    omega
  mode = mean_std_norm      or mean_norm (the reference yaml's default is mean_norm; its ALFWorld and Search
                            scripts use mean_std_norm, its WebShop script mean_norm)
  episode_stats = trajectory  the paper's Eq. 3: one value R_i per trajectory in the group's statistics; `steps` is
                            the reference code's variant (`compute_mean_std_cross_steps=True`, which its published
                            runs used): mean and std over all step rows of the group, each trajectory weighted by
                            its number of steps. Either way A^E is one value per trajectory here.
  similarity_thresh = null  the environment's `env.anchor_similarity` (ALFWorld 1.0: exact; Search-QA 0.9, the
                            reference's Search script); s < 1 clusters similar observations (`anchor_groups`).

Rewards: our env's step reward already includes the invalid-action penalty (ALFWorld: 10 * won - 0.1 * invalid),
so R_i = sum_k r_{i,k} carries every penalty of the trajectory and the penalty of step k is discounted into the
returns of the steps before it. The reference subtracts its penalty afterwards: from each row's episode score (so
rows of one trajectory differ by their own penalty) and from the discounted return of that row only.

Metrics: `gigpo/anchor_group_frac` (share of step rows whose anchor group has >= 2 steps),
`gigpo/mean_anchor_group_size` (steps per anchor group), `gigpo/step_adv_abs_mean` (mean |A^S| over the rows),
`gigpo/episode_adv_abs_mean` (mean |A^E| over the trajectories).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Hashable, Mapping, Optional, Sequence

import torch

from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import AlgorithmConfig, Advantages, Context, Estimator, Services, register_estimator

MODES = ("mean_std_norm", "mean_norm")
EPISODE_STATS = ("trajectory", "steps")
EPS = 1e-6


@dataclass
class GiGPOKnobs:
    """GiGPO's knobs (`algorithm.gigpo.*`, the reference's own node; also under any estimator whose `algorithm.base`
    may be gigpo: StepOPSD, RLSD, SDAR)."""

    gamma: float = 0.95  # discount of the step returns R^S (verl-agent's GiGPO scripts; its yaml default is 1.0)
    step_advantage_w: float = 1.0  # omega of A = A^E + omega * A^S
    mode: str = "mean_std_norm"  # or mean_norm (no std division); the reference yaml's default is mean_norm
    episode_stats: str = "trajectory"  # the paper's Eq. 3; `steps`: verl-agent's statistics over step rows
    # anchors: 1.0 exact equality (the paper); < 1 the reference's enable_similarity clustering at that difflib
    # ratio; null: the environment's `env.anchor_similarity` (ALFWorld 1.0; Search-QA 0.9, verl-agent's Search script)
    similarity_thresh: Optional[float] = None

    def __post_init__(self):
        check_knobs(self.gamma, self.step_advantage_w, self.mode, self.episode_stats, self.similarity_thresh)


@dataclass
class GiGPOConfig(AlgorithmConfig):
    gigpo: GiGPOKnobs = field(default_factory=GiGPOKnobs)


def check_knobs(gamma: float, step_advantage_w: float, mode: str, episode_stats: str,
                similarity_thresh: float | None = None) -> None:
    """ValueError (one line naming the knob) for a knob GiGPO cannot use."""
    for knob, value in (("gamma", gamma), ("step_advantage_w", step_advantage_w)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"algorithm.gigpo.{knob}={value!r}: need a finite number")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"algorithm.gigpo.gamma={gamma}: the discount must be in [0, 1]")
    if step_advantage_w < 0:
        raise ValueError(f"algorithm.gigpo.step_advantage_w={step_advantage_w}: the step-advantage weight must be >= 0")
    if mode not in MODES:
        raise ValueError(f"algorithm.gigpo.mode={mode!r}: choose one of {', '.join(MODES)}")
    if episode_stats not in EPISODE_STATS:
        raise ValueError(f"algorithm.gigpo.episode_stats={episode_stats!r}: choose one of {', '.join(EPISODE_STATS)}")
    check_similarity(similarity_thresh, "algorithm.gigpo.similarity_thresh")


def check_similarity(thresh: float | None, key: str) -> None:
    if thresh is not None and (isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 < thresh <= 1):
        raise ValueError(f"{key}={thresh!r}: need a similarity ratio in (0, 1] (1: identical observations only)")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")


def _group_stats(values: torch.Tensor, index: torch.Tensor, groups: int, weights: torch.Tensor):
    """Per-group count, mean and unbiased std of `values` [n] (float64) in groups `index` [n], each value counted
    `weights` times: as if every value were repeated that often."""
    count = torch.zeros(groups, dtype=torch.float64, device=values.device).index_add_(0, index, weights)
    total = torch.zeros_like(count).index_add_(0, index, weights * values)
    mean = total / count.clamp(min=1e-300)
    sq = torch.zeros_like(count).index_add_(0, index, weights * (values - mean[index]) ** 2)
    std = (sq / (count - 1).clamp(min=1e-300)).sqrt()
    return count, mean, std


def _normalise(values: torch.Tensor, index: torch.Tensor, groups: int, weights: torch.Tensor, mode: str, eps: float):
    """(values - group mean) [/ (group std + eps)], and each value's group count."""
    count, mean, std = _group_stats(values, index, groups, weights)
    centred = values - mean[index]
    out = centred / (std[index] + eps) if mode == "mean_std_norm" else centred
    return out, count[index]


def episode_advantages(rewards: torch.Tensor, groups: torch.Tensor, mode: str = "mean_std_norm", eps: float = EPS, *,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """A^E: rewards [M], groups [M] (any integer ids) -> [M] in the rewards' float dtype (float32 for integers).

    mean_std_norm: (R - mean_g) / (std_g + eps), unbiased std; mean_norm: R - mean_g. `counts` [M] (optional): how
    many values each trajectory contributes to its group's statistics (the `steps` variant: its step rows), one
    each when None. A group with fewer than two values takes mean 0 and std 1: A^E = R (the reference's rule)."""
    _check_mode(mode)
    if rewards.dim() != 1 or rewards.shape != groups.shape or (counts is not None and counts.shape != rewards.shape):
        raise ValueError(f"rewards, groups (and counts) must all be [M]; got {tuple(rewards.shape)}, "
                         f"{tuple(groups.shape)}" + ("" if counts is None else f", {tuple(counts.shape)}"))
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if not rewards.numel():
        return rewards.to(out_dtype)
    r = rewards.to(torch.float64)
    _, index = torch.unique(groups, return_inverse=True)
    w = torch.ones_like(r) if counts is None else counts.to(device=r.device, dtype=torch.float64)
    adv, n = _normalise(r, index, int(index.max()) + 1, w, mode, eps)
    return torch.where(n >= 2, adv, r).to(out_dtype)  # fewer than two values: mean 0, std 1


def discounted_returns(step_rewards: Sequence[Sequence[float]], gamma: float) -> list[list[float]]:
    """R^S: per trajectory, the step rewards [r_0, ..., r_{T-1}] -> [R^S_0, ..., R^S_{T-1}] with
    R^S_t = sum_{k >= t} gamma^(k - t) r_k (computed backwards: R^S_t = r_t + gamma R^S_{t+1})."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma}: the discount must be in [0, 1]")
    out = []
    for rewards in step_rewards:
        running, returns = 0.0, [0.0] * len(rewards)
        for t in reversed(range(len(rewards))):
            running = float(rewards[t]) + gamma * running
            returns[t] = running
        out.append(returns)
    return out


def anchor_groups(groups: torch.Tensor, anchors: Sequence[Hashable], similarity: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-state groups of N step rows: rows with the same episode group id (`groups` [N]) and the same anchor
    key share one. Returns each row's anchor group index [N] (0..K-1, in order of first appearance) and the K group
    sizes.

    similarity 1.0: identical keys (exact equality). Below 1 (the reference's `enable_similarity`, text keys only):
    within an episode group the rows are taken in order and each joins the first cluster whose representative (its
    first member) has `difflib.SequenceMatcher(None, rep, key).ratio() >= similarity`, else opens a new cluster."""
    if groups.dim() != 1 or len(anchors) != groups.numel():
        raise ValueError(f"groups must be [N] and anchors N long; got {tuple(groups.shape)} and {len(anchors)}")
    check_similarity(similarity, "similarity")
    ids: dict = {}
    if similarity >= 1.0:
        index = [ids.setdefault((g, a), len(ids)) for g, a in zip(groups.tolist(), anchors)]
    else:
        reps: dict = {}  # episode group -> [(representative key, cluster id)]
        index = []
        for g, key in zip(groups.tolist(), anchors):
            if not isinstance(key, str):
                raise ValueError(f"similarity anchors compare text observations; got a {type(key).__name__} key")
            clusters = reps.setdefault(g, [])
            found = next((c for rep, c in clusters if rep == key or SequenceMatcher(None, rep, key).ratio() >= similarity), None)
            if found is None:
                found = len(ids)
                ids[(g, len(clusters))] = found
                clusters.append((key, found))
            index.append(found)
    index = torch.tensor(index, dtype=torch.long, device=groups.device)
    sizes = torch.bincount(index, minlength=len(ids)) if len(ids) else torch.zeros(0, dtype=torch.long)
    return index, sizes


def step_advantages(returns: torch.Tensor, groups: torch.Tensor, anchors: Sequence[Hashable],
                    mode: str = "mean_std_norm", eps: float = EPS, similarity: float = 1.0) -> torch.Tensor:
    """A^S: per-row discounted returns R^S [N], episode group ids [N] and anchor keys (N hashables, e.g. the
    observation strings) -> [N] in the returns' float dtype (float32 for integers). Within each anchor group
    (same episode group, identical anchor, or similar ones: `anchor_groups`): mean_std_norm (R^S - mean) /
    (std + eps), unbiased std; mean_norm R^S - mean. A step alone in its anchor group gets 0."""
    if returns.dim() != 1 or returns.shape != groups.shape:
        raise ValueError(f"returns and groups must both be [N]; got {tuple(returns.shape)} and {tuple(groups.shape)}")
    return _anchored(returns, *anchor_groups(groups, anchors, similarity), mode, eps)


def _anchored(returns: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """`step_advantages` over anchor groups already formed (`anchor_groups`' index and sizes)."""
    _check_mode(mode)
    out_dtype = returns.dtype if returns.is_floating_point() else torch.float32
    if not returns.numel():
        return returns.to(out_dtype)
    r = returns.to(torch.float64)
    adv, n = _normalise(r, index, len(sizes), torch.ones_like(r), mode, eps)
    return torch.where(n >= 2, adv, torch.zeros_like(adv)).to(out_dtype)


@register_estimator("gigpo")
class GiGPO(Estimator):
    step_level = True  # StepOPSD over GiGPO budgets the teacher's multiplier, not |A| (docs/estimators.md)
    config = GiGPOConfig

    def __init__(self, knobs: GiGPOKnobs | None = None, eps: float = EPS):
        self.knobs = knobs or GiGPOKnobs()
        self.similarity = self.knobs.similarity_thresh or 1.0  # until `setup` gives the environment's
        self.eps = eps

    @classmethod
    def from_config(cls, algorithm: Mapping) -> "GiGPO":
        """`algorithm.gigpo` (absent, as under another estimator's `algorithm.base`: the schema's defaults)."""
        return cls(GiGPOKnobs(**algorithm.get("gigpo", {})))

    def setup(self, policy, services: Services) -> None:
        if self.knobs.similarity_thresh is None:  # the environment's notion of the same state
            check_similarity(services.anchor_similarity, "env.anchor_similarity")
            self.similarity = services.anchor_similarity

    def advantages(self, batch: RolloutBatch, ctx: Context) -> Advantages:
        trajs, k = batch.trajectories, self.knobs
        if len(trajs) != batch.traj_reward.numel():
            raise ValueError(f"GiGPO needs the batch's trajectory records (step rewards, observations): "
                             f"{len(trajs)} records for {batch.traj_reward.numel()} trajectories")
        device = batch.loss_mask.device
        rows = list(zip(batch.row_traj.tolist(), batch.row_step.tolist()))
        returns = discounted_returns([[s.transition.reward for s in t.steps] for t in trajs], k.gamma)
        row_returns = torch.tensor([returns[m][j] for m, j in rows], dtype=torch.float64, device=device)
        anchors = [trajs[m].steps[j].observation for m, j in rows]
        row_group = batch.traj_group.to(device)[batch.row_traj.to(device)]
        index, sizes = anchor_groups(row_group, anchors, self.similarity)
        a_step = _anchored(row_returns, index, sizes, k.mode, self.eps)  # [N] float64
        counts = None
        if k.episode_stats == "steps":  # each trajectory weighted by its step rows (verl-agent's cross-steps)
            counts = torch.bincount(batch.row_traj, minlength=len(trajs))
        a_ep = episode_advantages(batch.traj_reward.to(torch.float64), batch.traj_group, k.mode, self.eps,
                                  counts=counts)  # [M] float64
        row_adv = a_ep.to(device)[batch.row_traj.to(device)] + k.step_advantage_w * a_step  # [N]
        tokens = row_adv.to(batch.loss_mask.dtype)[:, None] * batch.loss_mask
        n = max(len(rows), 1)
        metrics = {
            "gigpo/anchor_group_frac": float(sizes[sizes >= 2].sum()) / n,
            "gigpo/mean_anchor_group_size": float(sizes.double().mean()) if sizes.numel() else 0.0,
            "gigpo/step_adv_abs_mean": float(a_step.abs().mean()) if a_step.numel() else 0.0,
            "gigpo/episode_adv_abs_mean": float(a_ep.abs().mean()) if a_ep.numel() else 0.0,
        }
        return Advantages(tokens, a_ep.to(device=device, dtype=batch.traj_reward.dtype), metrics)
