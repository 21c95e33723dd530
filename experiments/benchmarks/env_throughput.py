"""ALFWorld env throughput on GENERATED games: steps/s and reset time, 1 worker vs N workers.

Each configuration resets the same batch (tasks x group), then steps every live slot with a
seeded random admissible command (the engine work of an RL rollout, without a model) for a fixed
number of rounds. All configurations run in one command, so the ratio is measured on one machine
under one load. `--textgen plain cached` also compares the engine as shipped with the caches of
`stepopsd.envs.alfworld.engine_cache` (text generation and PDDL translation; the worker processes
read the switch). By default the timed reset loads the games of the warm-up reset again (in-process
caches warm); `--new-games` times a reset of games the workers have not loaded, as every training step
does (the translations then come from the disk cache, `$STEPOPSD_TRANSLATIONS`, or are computed). The
script uses only long-standing APIs, so `PYTHONPATH=<older checkout>` runs it on older code. Usage:
    python experiments/benchmarks/env_throughput.py --games DIR --workers 1 2 --tasks 4 --group 4 --rounds 25
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import time

from stepopsd.envs.alfworld import engine_cache
from stepopsd.envs.alfworld.env import AlfWorldEnv, load_tasks
from stepopsd.envs.alfworld.prompts import format_response


def run(tasks, group: int, workers: int, rounds: int, seed: int, textgen: str = "cached", warmup=None) -> dict:
    os.environ[engine_cache.DISABLE_VAR] = "1" if textgen == "plain" else ""  # read by the spawned workers
    rng = random.Random(seed)
    with AlfWorldEnv(num_workers=workers, max_steps=rounds + 1) as env:
        env.reset(warmup or tasks, group)  # warm-up: worker start-up (and, by default, the first game load) not measured
        t0 = time.perf_counter()
        states = env.reset(tasks, group)
        reset_s = time.perf_counter() - t0
        steps, t0 = 0, time.perf_counter()
        for _ in range(rounds):
            live = env.live_slots()
            if not live:
                break
            out = env.step({i: format_response("", rng.choice(states[i].admissible)) for i in live})
            for i, tr in out.items():
                states[i] = tr.state
            steps += len(out)
        step_s = time.perf_counter() - t0
    return {"workers": workers, "textgen": textgen, "slots": len(tasks) * group, "reset_s": reset_s, "steps": steps, "steps_per_s": steps / step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--games", required=True, help="folder of generated games (stepopsd-make-games --out DIR)")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--textgen", nargs="+", choices=["plain", "cached"], default=["cached"])
    p.add_argument("--new-games", action="store_true", help="time the reset of games the workers have not loaded yet")
    a = p.parse_args()
    every = load_tasks(a.games, a.split)
    tasks, warmup = every[:a.tasks], (every[a.tasks:2 * a.tasks] if a.new_games else None)
    label = "+".join(sorted({t.data_label for t in tasks}))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = [run(tasks, a.group, w, a.rounds, a.seed, t, warmup) for w in a.workers for t in a.textgen]
    base = rows[0]["steps_per_s"]
    print(f"ALFWorld env throughput [{label} games], commit {commit}, {len(tasks)} tasks x {a.group} group, {a.rounds} rounds"
          + (", timed reset of games new to the workers" if a.new_games else ""))
    print("| workers | textgen | slots | env steps | steps/s | speed-up vs first | reset (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['textgen']} | {r['slots']} | {r['steps']} | {r['steps_per_s']:.1f} | {r['steps_per_s'] / base:.2f}x | {r['reset_s']:.2f} |")


if __name__ == "__main__":
    main()
