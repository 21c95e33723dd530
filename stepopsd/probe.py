"""The Monte-Carlo credit probe: how well does each estimator's per-step credit match the true advantage of a step?

For trajectories the current policy samples, each probed step k of a trajectory gets a Monte-Carlo estimate of its
advantage under that policy,

    A_MC(s_k, a_k) = Q(s_k, a_k) - V(s_k),
    Q = mean over M continuations that take a_k at s_k, then follow the policy,   of  sum_{t >= k} r_t
    V = mean over M continuations that follow the policy from s_k (a fresh action), of sum_{t >= k} r_t
    SE = sqrt(var(Q samples) / M + var(V samples) / M)     (unbiased variances; undiscounted returns-to-go)

and every estimator's credit of the same step: its advantage averaged over the step's action (target) tokens (the
row's loss tokens when the step has none, an invalid step). Per estimator the probe reports the Spearman rank
correlation between credit and A_MC over the probed steps, and the sign agreement on the steps whose A_MC is
decided (|A_MC| > 2 SE). Where the environment knows each step's exact credit (`EnvSpec.exact_credit`: the credit
env), it also reports the agreement with the exact credit and the share of |credit| on pivotal steps.

States are restored by replay: a continuation starts from a fresh reset of the task and re-sends the trajectory's
first k (or k + 1) responses (`ReplayEnv`), so any environment whose steps are a function of the responses works
(ALFWorld's engine, the credit env); a replay that does not reproduce the recorded observations is an error.
Cost: `steps` x 2 x `continuations` episodes of at most the remaining horizon, generated `chunk` slots at a time.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from scipy import stats

from stepopsd.data.batch import RolloutBatch, build_batch
from stepopsd.estimators import Context
from stepopsd.rollout import RolloutConfig, rollout
from stepopsd.types import EnvState, Task, Trajectory, Transition


@dataclass
class ProbeConfig:
    """The `probe` config node (its schema: `stepopsd.schemas`)."""

    continuations: int = 8  # M: continuations per probed step for Q and again for V
    steps: int = 32  # steps probed per call, drawn uniformly (seeded) from the sampled trajectories' steps
    tasks: int = 4  # tasks rolled out per call, `rollout.group_size` times each (the estimators' groups)
    chunk: int = 256  # continuation slots per rollout call (bounds the env's and the generator's memory)
    every: int = 0  # the training callback: probe every N training steps (0: off)
    estimators: list = field(default_factory=list)  # the estimators compared ([]: every registered one)
    seed: int = 0

    def __post_init__(self):
        for knob in ("continuations", "steps", "tasks", "chunk"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probe.{knob}={value!r}: need an integer >= 1")
        if self.continuations < 2:
            raise ValueError(f"probe.continuations={self.continuations}: need >= 2 for a standard error")
        if self.every < 0:
            raise ValueError(f"probe.every={self.every}: need >= 0 (0: no probe during training)")


class ReplayError(RuntimeError):
    """The environment did not reproduce a recorded trajectory when its responses were sent again."""


class ReplayEnv:
    """An environment whose `reset(tasks, 1)` puts slot i in the state after `prefixes[i]`'s responses: a fresh
    reset of tasks[i], then those responses sent again, one turn for all slots at a time. The replayed transitions
    are kept (`replayed[i]`); `expected[i]`, when given, are the observations the replay must reproduce (one per
    replayed step: the state each step led to). Everything else is the wrapped environment's."""

    def __init__(self, env, prefixes: Sequence[Sequence[str]], expected: Sequence[Sequence[str]] | None = None):
        self.env, self.prefixes, self.expected = env, [tuple(p) for p in prefixes], expected
        self.replayed: list[list[Transition]] = []

    def reset(self, tasks: Sequence[Task], group_size: int) -> list[EnvState]:
        if group_size != 1 or len(tasks) != len(self.prefixes):
            raise ValueError(f"a replay resets one slot per prefix: {len(self.prefixes)} tasks, group size 1; got "
                             f"{len(tasks)} tasks, group size {group_size}")
        states = list(self.env.reset(tasks, 1))
        self.replayed = [[] for _ in tasks]
        for turn in range(max((len(p) for p in self.prefixes), default=0)):
            todo = {slot: p[turn] for slot, p in enumerate(self.prefixes) if turn < len(p)}
            for slot, tr in self.env.step(todo).items():
                if self.expected is not None and tr.state.observation != self.expected[slot][turn]:
                    raise ReplayError(f"replaying task {tasks[slot].task_id} step {turn}: the environment answered "
                                      f"{tr.state.observation[:80]!r}, the trajectory recorded "
                                      f"{self.expected[slot][turn][:80]!r}; the probe needs an environment whose steps "
                                      "depend only on the responses sent")
                states[slot] = tr.state
                self.replayed[slot].append(tr)
        return states

    def live_slots(self) -> list[int]:
        return self.env.live_slots()

    def prompt(self, slot: int) -> str:
        return self.env.prompt(slot)

    def target_chars(self, response: str, mode: str):
        return self.env.target_chars(response, mode)

    def step(self, responses):
        return self.env.step(responses)


@dataclass(frozen=True)
class StepEstimate:
    """A_MC of one probed step (trajectory index into the probed batch's trajectories, step k)."""

    traj: int
    step: int
    q: float  # mean return-to-go after taking a_k
    v: float  # mean return-to-go from s_k
    se: float  # standard error of q - v
    first_actions: tuple  # the V continuations' first actions at s_k (None: invalid), for the env's p(a | s_k)

    @property
    def advantage(self) -> float:
        return self.q - self.v


def returns_to_go(trajectory: Trajectory, replayed: Sequence[Transition]) -> float:
    """Rewards of the replayed steps after a prefix's first ones (Q: step k itself) plus the continuation's."""
    return sum(t.reward for t in replayed) + trajectory.outcome_reward


def mc_advantages(env, backend, tokenizer, trajectories: Sequence[Trajectory], picks: Sequence[tuple[int, int]],
                  rollout_cfg: RolloutConfig, *, continuations: int, chunk: int = 256, seed: int = 0
                  ) -> list[StepEstimate]:
    """A_MC for every (trajectory index, step) in `picks`: `continuations` episodes from s_k (V) and as many taking
    a_k first (Q), by replay in `env` (reset for every `chunk` of continuation slots; not closed here)."""
    m = continuations
    jobs = []  # (pick index, kind, prefix responses, expected observations)
    for p, (i, k) in enumerate(picks):
        steps = trajectories[i].steps
        responses = [s.response for s in steps]
        seen = [s.transition.state.observation for s in steps]
        for kind, length in (("v", k), ("q", k + 1)):
            jobs += [(p, kind, responses[:length], seen[:length])] * m
    returns = {(p, kind): [] for p in range(len(picks)) for kind in ("v", "q")}
    first = {p: [] for p in range(len(picks))}
    cfg = dataclasses.replace(rollout_cfg, group_size=1)
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        tasks = [trajectories[picks[p][0]].task for p, *_ in part]
        replay = ReplayEnv(env, [j[2] for j in part], [j[3] for j in part])
        continued, _ = rollout(replay, backend, tokenizer, tasks, cfg, seed=seed * 7919 + start)
        for (p, kind, _, _), replayed, cont in zip(part, replay.replayed, continued):
            k = picks[p][1]
            returns[p, kind].append(returns_to_go(cont, replayed[k:]))
            if kind == "v":
                first[p].append(cont.steps[0].transition.action if cont.steps and cont.steps[0].transition.valid
                                else None)
    out = []
    for p, (i, k) in enumerate(picks):
        q, v = returns[p, "q"], returns[p, "v"]
        se = math.sqrt(_var(q) / len(q) + _var(v) / len(v))
        out.append(StepEstimate(i, k, sum(q) / len(q), sum(v) / len(v), se, tuple(first[p])))
    return out


def _var(x: Sequence[float]) -> float:
    mean = sum(x) / len(x)
    return sum((a - mean) ** 2 for a in x) / (len(x) - 1)


def step_credit(advantages: torch.Tensor, batch: RolloutBatch) -> dict[tuple[int, int], float]:
    """An estimator's credit of every step: (trajectory index, step k) -> its per-token advantages [N, L] averaged
    over the step's target (action) tokens, or over the row's loss tokens when the step has no target."""
    out = {}
    for r in range(batch.num_rows):
        m, k = int(batch.row_traj[r]), int(batch.row_step[r])
        target = (batch.step_ids[r] == k) & (batch.loss_mask[r] > 0)
        tokens = target if target.any() else batch.loss_mask[r] > 0
        out[m, k] = float(advantages[r][tokens].mean()) if tokens.any() else 0.0
    return out


def agreement(credit: Sequence[float], reference: Sequence[float], decided: Sequence[bool] | None = None) -> dict:
    """Spearman's rho between credit and reference (nan when either is constant), and the share of steps where their
    signs agree among the `decided` ones (all with a non-zero reference when None), with that count."""
    c, r = list(map(float, credit)), list(map(float, reference))
    rho = float("nan")
    if len(c) >= 2 and len(set(c)) > 1 and len(set(r)) > 1:
        rho = float(stats.spearmanr(c, r).statistic)
    use = [i for i in range(len(r)) if (decided[i] if decided is not None else r[i] != 0)]
    agree = [math.copysign(1, c[i]) == math.copysign(1, r[i]) and c[i] != 0 for i in use]
    return {"spearman": rho, "sign_agreement": sum(agree) / len(agree) if agree else float("nan"),
            "decided_steps": len(use)}


def pick_steps(trajectories: Sequence[Trajectory], count: int, seed: int) -> list[tuple[int, int]]:
    """Up to `count` (trajectory, step) pairs drawn uniformly without replacement, seeded, in order."""
    every = [(i, k) for i, t in enumerate(trajectories) for k in range(len(t.steps))]
    return sorted(random.Random(seed).sample(every, min(count, len(every))))


@dataclass
class ProbeResult:
    estimates: list[StepEstimate]
    credit: dict[str, list[float]]  # estimator -> credit of each probed step (in `estimates` order)
    exact: list[float] | None  # the environment's exact credit of each probed step, when it has one
    pivotal: list[bool] | None
    metrics: dict  # probe/<estimator>/<what> and probe/... summaries
    trajectories: tuple[Trajectory, ...]


def summarise(estimates: Sequence[StepEstimate], credit: dict[str, list[float]], exact: list[float] | None,
              pivotal: list[bool] | None) -> dict:
    """The probe's metrics: per estimator against A_MC (and the exact credit, the pivotal share), and the probe's
    own check against the exact credit (mean |z| = |A_MC - exact| / SE, the share within 2 SE)."""
    a = [e.advantage for e in estimates]
    decided = [abs(e.advantage) > 2 * e.se for e in estimates]
    out = {"probe/steps": float(len(estimates)), "probe/decided_frac": sum(decided) / max(len(decided), 1),
           "probe/mc_abs_mean": sum(map(abs, a)) / max(len(a), 1),
           "probe/mc_se_mean": sum(e.se for e in estimates) / max(len(estimates), 1)}
    if exact is not None:
        z = [abs(x - e.advantage) / e.se if e.se > 0 else (0.0 if x == e.advantage else float("inf"))
             for x, e in zip(exact, estimates)]
        out |= {"probe/mc_vs_exact_abs_z": sum(z) / max(len(z), 1),
                "probe/mc_within_2se_frac": sum(x <= 2 for x in z) / max(len(z), 1)}
    for name, c in credit.items():
        for key, value in agreement(c, a, decided).items():
            out[f"probe/{name}/{key}"] = float(value)
        if exact is not None:
            exact_agreement = agreement(c, exact)
            out[f"probe/{name}/exact_spearman"] = exact_agreement["spearman"]
            out[f"probe/{name}/exact_sign_agreement"] = exact_agreement["sign_agreement"]
        if pivotal is not None:
            total = sum(map(abs, c))
            out[f"probe/{name}/pivotal_share"] = (sum(abs(x) for x, p in zip(c, pivotal) if p) / total
                                                  if total > 0 else float("nan"))
    return out


def probe(env, backend, tokenizer, tasks: Sequence[Task], rollout_cfg: RolloutConfig, estimators: dict,
          cfg: ProbeConfig, *, ctx: Context, exact: Callable | None = None) -> ProbeResult:
    """Sample `rollout_cfg.group_size` trajectories of each task with the policy behind `backend`, estimate A_MC of
    `cfg.steps` of their steps, and compare every estimator's credit of those steps (`estimators`: name -> an
    `Estimator` already `setup`, called with `ctx`). `exact(trajectory, step, first_actions)` -> (exact credit,
    pivotal) is the environment's (`EnvSpec.exact_credit`), or None."""
    t0 = time.perf_counter()
    sampled, _ = rollout(env, backend, tokenizer, tasks, rollout_cfg, seed=cfg.seed)
    batch, _ = build_batch(sampled, pad_id=tokenizer.pad_token_id)
    kept = batch.trajectories  # the trajectories of the groups the estimators see (failed ones and lone members out)
    picks = pick_steps(kept, cfg.steps, cfg.seed)
    estimates = mc_advantages(env, backend, tokenizer, kept, picks, rollout_cfg, continuations=cfg.continuations,
                              chunk=cfg.chunk, seed=cfg.seed)
    credit = {}
    for name, estimator in estimators.items():
        per_step = step_credit(estimator.advantages(batch, ctx).tokens, batch)
        credit[name] = [per_step[i, k] for i, k in picks]
    exact_credit = pivotal = None
    if exact is not None:
        pairs = [exact(kept[e.traj], e.step, e.first_actions) for e in estimates]
        exact_credit, pivotal = [x for x, _ in pairs], [p for _, p in pairs]
    metrics = summarise(estimates, credit, exact_credit, pivotal)
    metrics["time/probe_s"] = time.perf_counter() - t0
    return ProbeResult(estimates, credit, exact_credit, pivotal, metrics, tuple(kept))


def probe_estimators(names: Sequence[str], env_node: Mapping) -> dict:
    """name -> the estimator with its schema's defaults (`algorithm=<name>`'s knobs; the environment's protocol for
    the target span and the peer budget of teacher-shaped ones), not yet `setup`."""
    from omegaconf import OmegaConf

    from stepopsd.estimators import build_estimator, get_estimator

    def protocol(node):
        if isinstance(node, dict):
            return {k: env_node[k] if k in ("target_span", "peer_budget_tokens") and k in env_node else protocol(v)
                    for k, v in node.items()}
        return node

    out = {}
    for name in names:
        node = OmegaConf.to_container(OmegaConf.structured(get_estimator(name).config))
        out[name] = build_estimator(protocol(node) | {"name": name})
    return out


def report(result: ProbeResult, label: str) -> str:
    """The probe's table: one row per estimator (credit against A_MC, and against the exact credit when known)."""
    m = result.metrics
    exact = result.exact is not None
    head = ["estimator", "spearman vs MC", "sign agree (decided)"] + (
        ["spearman vs exact", "sign agree vs exact", "pivotal share"] if exact else [])
    lines = [f"[{label} data] credit probe: {int(m['probe/steps'])} steps, {m['probe/decided_frac']:.0%} decided "
             f"(|A_MC| > 2 SE), mean |A_MC| {m['probe/mc_abs_mean']:.3f}, mean SE {m['probe/mc_se_mean']:.3f}"
             + (f"; A_MC within 2 SE of the exact credit on {m['probe/mc_within_2se_frac']:.0%} of steps" if exact else ""),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in result.credit:
        cells = [name, f"{m[f'probe/{name}/spearman']:.3f}",
                 f"{m[f'probe/{name}/sign_agreement']:.3f} ({int(m[f'probe/{name}/decided_steps'])})"]
        if exact:
            cells += [f"{m[f'probe/{name}/exact_spearman']:.3f}", f"{m[f'probe/{name}/exact_sign_agreement']:.3f}",
                      f"{m[f'probe/{name}/pivotal_share']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
