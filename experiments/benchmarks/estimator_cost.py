"""What each advantage estimator costs against GRPO: per-step time and peak memory of the CPU main job, as ratios.

Every registered estimator (`stepopsd.estimators.estimator_names()`, so a new one is picked up), plus StepOPSD over
GiGPO (`algorithm=stepopsd algorithm.base=gigpo`, arm `stepopsd+gigpo`), runs the CPU main job as a subprocess, one at
a time, for --steps training steps:

    OMP_NUM_THREADS=1 python train.py experiment=alfworld_heat machine=cpu algorithm=<name> training_steps=<S> \
        val_every=100000 val_tasks=1 callbacks.progress_bar=plain hydra.run.dir=<tmp>

(validation on one task at the start and the end only; the games and the SFT policy cached under PROJECT_ROOT,
default this checkout; OMP_NUM_THREADS defaults to 1 unless set). Every repeat runs every arm, in the opposite order
to the repeat before (and rotated every second repeat), so the drift of a shared machine hits all arms alike.

Per run:
- step s: the wall time of each training step, from when the child's plain progress line of the step before arrived
  to when this step's did (validations happen only before step 1 and after the last); the median over steps
  2..S (step 1 carries the warm-up: first allocations, the first teacher snapshot). The default, 2 steps a run and
  2 repeats (the least that gives a measured step and a range over repeats), is 20 runs of ~75-90 s on one core of
  a quiet 2-core Xeon (~25 s of start-up and two one-task validations, ~25-30 s a step): about 25-30 minutes, more
  when other jobs share the machine (44 min in the README's run);
- step CPU s: the trainer process's CPU seconds (user + system, all its threads, from /proc/<pid>/stat read as each
  progress line arrives) over the same steps: on a machine shared with other jobs the wall time stretches with
  their load, the CPU time much less (the environment workers' CPU is not in it: the same code for every arm);
- its phases from `metrics.csv` (same steps): `time/rollout_s`, the advantage phase `time/rescore_s` (the teacher's
  hindsight passes; only teacher-shaped estimators log it, the others' advantages take milliseconds) and
  `time/update_s` (the PPO update, with an estimator's own loss term);
- peak RSS: `ru_maxrss` of the child from `os.wait4` (the largest single process among the child and the
  descendants it waited for, in practice the trainer).
Ratios to GRPO are taken within a repeat (arm / the same repeat's GRPO), then summarised over repeats as median
(min-max). Note: from step 2 on each arm trains on its own rollouts (its policy has moved differently), so rollout and
update times also differ by what was sampled; the advantage phase is the estimator's own.

Writes the raw per-run numbers to --out (JSON) and prints a markdown table. Usage:
    OMP_NUM_THREADS=1 python experiments/benchmarks/estimator_cost.py                 # defaults: 2 steps, 2 repeats (~25-30 min)
    python experiments/benchmarks/estimator_cost.py --algorithms grpo stepopsd rlsd --steps 4 --repeats 3
    python experiments/benchmarks/estimator_cost.py --from-json experiments/benchmarks/results/estimator_cost.json
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "experiments", "benchmarks", "results", "estimator_cost.json")
BASELINE = "grpo"
EXTRA_ARMS = {"stepopsd+gigpo": ["algorithm=stepopsd", "algorithm.base=gigpo"]}  # arm -> overrides
PHASES = ("time/rollout_s", "time/rescore_s", "time/update_s", "perf/update_tokens_per_s")
STEP_LINE = re.compile(r"^\[train\] step (\d+)/(\d+) · ")
GIB = 1024 ** 3


def train_command(overrides: list[str], steps: int, run_dir: str) -> list[str]:
    return [sys.executable, "train.py", "experiment=alfworld_heat", "machine=cpu", *overrides,
            f"training_steps={steps}", "val_every=100000", "val_tasks=1", "callbacks.progress_bar=plain",
            f"hydra.run.dir={run_dir}"]


def known_arms() -> dict[str, list[str]]:
    """Arm name -> its Hydra overrides: every registered estimator that runs on ALFWorld (not the oracle, which needs
    an environment that knows each step's exact credit), then the extra arms whose estimators exist."""
    from stepopsd.estimators import estimator_names, get_estimator

    names = [n for n in estimator_names() if not getattr(get_estimator(n), "needs_exact_credit", False)]
    arms = {n: [f"algorithm={n}"] for n in sorted(names, key=lambda n: (n != BASELINE, n))}
    for arm, overrides in EXTRA_ARMS.items():
        if all(o.split("=", 1)[1] in names for o in overrides if o.startswith(("algorithm=", "algorithm.base="))):
            arms[arm] = overrides
    return arms


class OneLineParser(argparse.ArgumentParser):
    """Refuses a bad flag in one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value
    return parse


def parse_args(argv: list[str] | None = None, arms: dict[str, list[str]] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="estimator_cost.py", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive(2), default=2,
                   help="training steps a run (>= 2: the first is warm-up, steps 2.. are measured)")
    p.add_argument("--repeats", type=positive(1), default=2, help="runs of every arm, interleaved")
    p.add_argument("--algorithms", nargs="+", metavar="ARM",
                   help=f"a subset of the arms (registered estimators and {', '.join(EXTRA_ARMS)}); {BASELINE} is "
                        "always run, as the baseline")
    p.add_argument("--out", default=DEFAULT_OUT, help="raw per-run numbers (JSON)")
    p.add_argument("--retries", type=positive(0), default=2,
                   help="a failed run is retried this many times, a minute apart (a tree others are editing)")
    p.add_argument("--keep-runs", metavar="DIR", help="keep the run folders under DIR (default: a temporary folder, removed)")
    p.add_argument("--from-json", metavar="JSON", help="no runs: print the table of a saved --out file")
    a = p.parse_args(argv)
    if a.from_json is not None:
        if not os.path.isfile(a.from_json):
            p.error(f"--from-json {a.from_json}: no such file")
        return a
    if os.path.isdir(a.out) or not os.path.basename(a.out):
        p.error(f"--out {a.out}: give a file path (JSON), not a folder")
    arms = known_arms() if arms is None else arms
    if a.algorithms is not None:
        unknown = [n for n in a.algorithms if n not in arms]
        if unknown:
            p.error(f"--algorithms: unknown {', '.join(unknown)}; choose from {', '.join(arms)}")
    chosen = set(a.algorithms or arms) | {BASELINE}
    a.arms = {n: o for n, o in arms.items() if n in chosen}
    return a


def run_order(arms: list[str], repeat: int) -> list[str]:
    """Repeat 0: the given order; odd repeats: the reverse of the one before; every second pair rotated by one."""
    shift = (repeat // 2) % len(arms)
    order = arms[shift:] + arms[:shift]
    return order[::-1] if repeat % 2 else order


def step_phases(run_dir: str) -> dict[int, dict[str, float]]:
    """Training step (1-based) -> its logged phase values from `metrics.csv`."""
    paths = glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv"))
    steps: dict[int, dict[str, float]] = {}
    if not paths:
        return steps
    with open(sorted(paths)[-1]) as f:
        for row in csv.DictReader(f):
            values = {k: float(row[k]) for k in PHASES if row.get(k)}
            if values and row.get("train_step"):
                steps.setdefault(int(float(row["train_step"])), {}).update(values)
            elif values:  # the rescoring row of a step is logged before its update row: same Lightning step
                steps.setdefault(int(row["step"]) + 1, {}).update(values)
    return steps


def run_once(arm: str, overrides: list[str], steps: int, run_dir: str, env: dict) -> dict:
    """One child run: its step wall times (line arrivals), phases, peak RSS, exit code."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = train_command(overrides, steps, run_dir)
    t0 = time.monotonic()
    arrivals: dict[int, float] = {}
    cpu: dict[int, float | None] = {}
    tail: list[str] = []
    with open(os.path.join(run_dir, "child.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            now = time.monotonic()
            log.write(line)
            m = STEP_LINE.match(line)
            if m:
                arrivals[int(m.group(1))] = now
                cpu[int(m.group(1))] = process_cpu_s(proc.pid)
            tail = (tail + [line.rstrip()])[-5:]
        _, status, usage = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        proc.stdout.close()
    wall = time.monotonic() - t0
    step_s = [arrivals[k] - arrivals[k - 1] for k in range(2, steps + 1) if k in arrivals and k - 1 in arrivals]
    step_cpu_s = [cpu[k] - cpu[k - 1] for k in range(2, steps + 1) if cpu.get(k) is not None and cpu.get(k - 1) is not None]
    phases = step_phases(run_dir)
    measured = {k: [phases[s][k] for s in range(2, steps + 1) if k in phases.get(s, {})] for k in PHASES}
    return {"arm": arm, "overrides": overrides, "rc": rc, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
            "step_s": step_s, "step_cpu_s": step_cpu_s, "load_average_1min_end": os.getloadavg()[0], "phases": {k: v for k, v in measured.items() if v},
            "tail": tail if rc else []}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads) from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15: utime, stime
    except (OSError, IndexError, ValueError):
        return None


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": list(os.getloadavg())}


def code_version() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_under_stepopsd": sorted(p for p in changed if p.startswith("stepopsd/"))}


def median(values):
    return statistics.median(values) if values else None


def summarize(raw: dict) -> list[dict]:
    """One row per arm: absolute medians and, per repeat, the ratio to that repeat's GRPO run."""
    runs = [r for r in raw["runs"] if r["rc"] == 0 and r["step_s"]]
    base = {r["repeat"]: r for r in runs if r["arm"] == BASELINE}
    arms = list(dict.fromkeys(r["arm"] for r in raw["runs"]))
    rows = []
    for arm in sorted(arms, key=lambda a: (a != BASELINE, arms.index(a))):
        mine = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "runs": len(mine), "steps": sum(len(r["step_s"]) for r in mine)}
        for key, values in (("step_s", [s for r in mine for s in r["step_s"]]),
                            ("step_cpu_s", [s for r in mine for s in r.get("step_cpu_s", [])]),
                            *((k, [v for r in mine for v in r["phases"].get(k, [])]) for k in PHASES),
                            ("peak_rss_gib", [r["peak_rss_bytes"] / GIB for r in mine])):
            row[key] = median(values)
        for key, value in (("step_ratio", lambda r: median(r["step_s"])),
                           ("cpu_ratio", lambda r: median(r.get("step_cpu_s", []))),
                           ("update_ratio", lambda r: median(r["phases"].get("time/update_s", [])) or None),
                           ("rss_ratio", lambda r: r["peak_rss_bytes"])):
            ratios = [value(r) / value(base[r["repeat"]]) for r in mine
                      if r["repeat"] in base and value(r) and value(base[r["repeat"]])]
            row[key] = (median(ratios), min(ratios), max(ratios)) if ratios else None
        rows.append(row)
    return rows


def table(raw: dict) -> str:
    def num(v, fmt=".2f"):
        return "-" if v is None else format(v, fmt)

    def ratio(v):
        if v is None:
            return "-"
        mid, lo, hi = v
        return f"{mid:.2f}" if lo == hi else f"{mid:.2f} ({lo:.2f}-{hi:.2f})"

    lines = ["| estimator | runs x steps | step s | step / GRPO | step CPU s | step CPU / GRPO | rollout s "
             "| advantage (teacher) s | update s | update / GRPO | peak RSS GiB | peak RSS / GRPO |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarize(raw):
        name = r["arm"].replace("+", " over ") if "+" in r["arm"] else r["arm"]
        lines.append(" | ".join([f"| {name}", f"{r['runs']} x {r['steps'] // max(r['runs'], 1)}", num(r["step_s"]),
                                 ratio(r["step_ratio"]), num(r["step_cpu_s"]), ratio(r["cpu_ratio"]),
                                 num(r["time/rollout_s"]), num(r["time/rescore_s"]),
                                 num(r["time/update_s"]), ratio(r["update_ratio"]), num(r["peak_rss_gib"]),
                                 ratio(r["rss_ratio"])]) + " |")
    failed = [f"{r['arm']} (repeat {r['repeat']}, rc {r['rc']})" for r in raw["runs"] if r["rc"] != 0]
    if failed:
        lines.append(f"\nFailed runs (not in the table): {', '.join(failed)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            print(table(json.load(f)))
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PROJECT_ROOT", ROOT)
    raw = {"script": "experiments/benchmarks/estimator_cost.py", "argv": sys.argv[1:], "steps": a.steps,
           "repeats": a.repeats, "omp_num_threads": env["OMP_NUM_THREADS"], "project_root": env["PROJECT_ROOT"],
           "train_command": " ".join(train_command(["algorithm=<name>"], a.steps, "<dir>")[1:]),
           "machine": machine(), **code_version(), "runs": []}
    work = a.keep_runs or tempfile.mkdtemp(prefix="estimator_cost-")
    t_start = time.monotonic()
    try:
        names = list(a.arms)
        for repeat in range(a.repeats):
            for position, arm in enumerate(run_order(names, repeat)):
                for attempt in range(a.retries + 1):
                    run_dir = os.path.join(work, f"r{repeat}", f"{arm}-{attempt}")
                    result = run_once(arm, a.arms[arm], a.steps, run_dir, env)
                    result |= {"repeat": repeat, "position": position, "attempt": attempt}
                    if result["rc"] == 0 or attempt == a.retries:
                        break
                    print(f"[{arm} repeat {repeat}] exit {result['rc']}: {result['tail'][-1] if result['tail'] else ''}; "
                          "retrying in 60 s", flush=True)
                    time.sleep(60)
                raw["runs"].append(result)
                steps = ", ".join(f"{s:.1f}" for s in result["step_s"])
                cpus = ", ".join(f"{s:.1f}" for s in result["step_cpu_s"])
                print(f"[repeat {repeat + 1}/{a.repeats}] {arm}: rc {result['rc']}, steps 2..{a.steps} [{steps}] s (CPU [{cpus}] s), "
                      f"peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB, run {result['wall_s']:.0f} s "
                      f"(total {time.monotonic() - t_start:.0f} s)", flush=True)
    finally:
        raw["total_s"] = time.monotonic() - t_start
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(raw, f, indent=1)
        if not a.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    print(table(raw))
    print(f"\n{len(raw['runs'])} runs in {raw['total_s'] / 60:.1f} min; raw numbers in {a.out}")


if __name__ == "__main__":
    main()
