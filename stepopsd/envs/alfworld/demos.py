"""Expert demonstrations as an SFT dataset: `stepopsd-demos --data DIR --out demos.jsonl`.

Each line is one agent step of an episode played by the `alfworld` package's expert: the prompt the
policy would see at that step (the protocol's template, full or compact) and the response
`<think>...</think><action>...</action>`. With `--epsilon` the episode takes a random admissible
action with that probability, and with `--repeat` it repeats its last command again when that is
no longer admissible ("Nothing happens."); those detours are kept in the later prompts' history (so the data
shows recovery) but are not training targets unless `--keep-random`. Only episodes the expert
finishes are written unless `--keep-failed`. Every record says `"data": "generated"` or
`"official"` after the games it comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from stepopsd.envs.alfworld.env import DataNotFoundError, load_tasks
from stepopsd.envs.alfworld.expert import ExpertEpisode, iter_experts
from stepopsd.envs.alfworld.prompts import format_response, render_prompt
from stepopsd.envs.alfworld.tasks import GENERATED_KEY
from stepopsd.progress import Progress
from stepopsd.types import Task


DEMO_FORMAT = 3  # bump when the records change (the tiny policy's cache key includes it)


@dataclass(frozen=True)
class DemoOptions:
    epsilon: float = 0.0
    seed: int = 0
    repeat: float = 0.0  # probability of an inadmissible repeat of the last command (see expert.play_expert)
    compact: bool = False
    history_length: int = 2
    max_steps: int = 50
    keep_random: bool = False
    keep_failed: bool = False

    def __post_init__(self):
        if not (0.0 <= self.epsilon < 1.0 and 0.0 <= self.repeat < 1.0):
            raise ValueError(f"epsilon={self.epsilon} and repeat={self.repeat} must be in [0, 1)")
        if self.history_length < 0 or self.max_steps < 1:
            raise ValueError("history_length must be >= 0 and max_steps >= 1")


def think_text(goal: str, action: str) -> str:
    """A short, fixed rationale: the policy learns the format; RL shapes the reasoning. (The goal
    is in the prompt; copying it into every response would cost a tiny policy tokens and accuracy.)"""
    return f"next i should {action}."


def episode_records(task: Task, ep: ExpertEpisode, opts: DemoOptions) -> list[dict]:
    records, history = [], []
    for k, step in enumerate(ep.steps):
        if step.is_expert or opts.keep_random:
            records.append({
                "task_id": task.task_id, "task_type": task.task_type, "data": task.data_label, "step": k,
                "prompt": render_prompt(ep.goal, step.observation, step.admissible, history, k,
                                        history_length=opts.history_length, compact=opts.compact),
                "response": format_response(think_text(ep.goal, step.action), step.action),
                "is_expert": step.is_expert, "won": ep.won,
            })
        history.append((step.observation, step.action))
    return records


def _expert_of(task: Task) -> str:
    with open(os.path.join(os.path.dirname(task.source), "traj_data.json")) as f:
        return json.load(f).get(GENERATED_KEY, {}).get("expert", "handcoded")


def export_demos(tasks: list[Task], out: str, opts: DemoOptions, workers: int | None = None) -> dict:
    """Play every task once with the expert and write the JSONL dataset; returns counts."""
    jobs = [(t.source, {"max_steps": opts.max_steps, "epsilon": opts.epsilon, "repeat": opts.repeat, "expert": _expert_of(t),
                        "seed": opts.seed * 100003 + i}) for i, t in enumerate(tasks)]
    episodes = []
    with Progress("demos", len(jobs), "episode", description="Expert demonstrations") as bar:
        for ep in iter_experts(jobs, workers):
            episodes.append(ep)
            bar.advance(won=sum(e.won for e in episodes))
    per_task = [episode_records(t, ep, opts) if (ep.won or opts.keep_failed) else [] for t, ep in zip(tasks, episodes)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        for records in per_task:
            for r in records:
                f.write(json.dumps(r) + "\n")
    os.replace(tmp, out)  # an interrupted export never leaves half a file behind
    return {"episodes": len(tasks), "episodes_written": sum(1 for r in per_task if r),
            "records": sum(len(r) for r in per_task), "data": "+".join(sorted({t.data_label for t in tasks}))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stepopsd-demos", description="Export ALFWorld expert demonstrations (JSONL) for SFT.")
    p.add_argument("--data", default=None, help="folder holding json_2.1.1/ (default $ALFWORLD_DATA)")
    p.add_argument("--split", default="train")
    p.add_argument("--task-types", nargs="+", default=["all"])
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--epsilon", type=float, default=0.0, help="probability of a random admissible action per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=float, default=0.0,
                   help="probability of repeating the last command once it is inadmissible (shows recovery)")
    p.add_argument("--compact", action="store_true", help="use the compact prompt template (tiny policies)")
    p.add_argument("--history-length", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--keep-random", action="store_true", help="also write the random steps as targets")
    p.add_argument("--keep-failed", action="store_true", help="also write episodes the expert did not finish")
    p.add_argument("--limit", type=int, default=None, help="at most this many games")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    try:
        opts = DemoOptions(epsilon=a.epsilon, seed=a.seed, repeat=a.repeat, compact=a.compact, history_length=a.history_length,
                           max_steps=a.max_steps, keep_random=a.keep_random, keep_failed=a.keep_failed)
        tasks = load_tasks(a.data, a.split, a.task_types, a.limit)
    except (ValueError, DataNotFoundError) as e:
        print(f"stepopsd-demos: error: {e}", file=sys.stderr)
        return 2
    counts = export_demos(tasks, a.out, opts, a.workers)
    print(f"[{counts['data']} games] wrote {counts['records']} steps from {counts['episodes_written']}/"
          f"{counts['episodes']} episodes to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
