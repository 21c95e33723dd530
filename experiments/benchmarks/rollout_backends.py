"""HF vs vLLM on the same multi-turn rollout: generated tokens/s, rollout seconds per training step, env share.

Both backends roll out the same training batches as `python train.py experiment=alfworld_heat machine=cpu`
(its config, generated games, the cached SFT tiny policy, the same tasks and rollout seeds, the same number
of environments), one after the other in one process, after one warm-up batch each. vLLM runs in process
and sets torch's threads to 1 when it starts, so run the whole command with OMP_NUM_THREADS fixed
(the HF rows then use the same thread count). The episodes differ between backends (each samples its own
tokens), so tokens/s is the comparable number; rollout seconds and the env share follow from it. Usage
(where vLLM is installed, e.g. the `.venv-vllm` of `.ci/run`):
    OMP_NUM_THREADS=1 .venv-vllm/bin/python experiments/benchmarks/rollout_backends.py --steps 3
Extra arguments are Hydra overrides (GPU rows: model=qwen3_1.7b model.init=random trainer.accelerator=gpu
trainer.precision=bf16-mixed ...).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

from train_step_speed import setup  # the main job's config, data and cached policy

from stepopsd.policy.backends.hf import HFBackend
from stepopsd.rollout import rollout
from stepopsd.build import backend_factory, env_factory


def measure(name, backend, env, tokenizer, tasks, rollout_cfg, cfg, steps: int) -> dict:
    per_step = len(tasks) // (steps + 1)
    rows = []
    for i in range(steps + 1):  # batch 0 warms up (allocations, the engine's first prefill)
        batch = tasks[i * per_step:(i + 1) * per_step]
        t0 = time.perf_counter()
        _, stats = rollout(env, backend, tokenizer, batch, rollout_cfg, seed=cfg.seed + 100_003 * i)
        seconds = time.perf_counter() - t0
        if i:
            rows.append((seconds, stats.generate_s, stats.env_s, stats.generated_tokens))
        print(f"  {name} batch {i}{' (warm-up)' if not i else ''}: rollout {seconds:.2f} s, generate "
              f"{stats.generate_s:.2f} s, env {stats.env_s:.2f} s, {stats.generated_tokens} tokens", flush=True)
    tokens, gen = sum(r[3] for r in rows), sum(r[1] for r in rows)
    return {"backend": name, "tokens_per_s": tokens / gen, "rollout_s": statistics.median(r[0] for r in rows),
            "env_share": sum(r[2] for r in rows) / sum(r[0] for r in rows), "steps": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed batches per backend (after one warm-up)")
    args, overrides = parser.parse_known_args()
    cfg, ppo, method, rollout_cfg, tasks, policy, tokenizer = setup(overrides)
    per_step = cfg.tasks_per_step
    tasks = (tasks * (per_step * (args.steps + 1) // len(tasks) + 1))[:per_step * (args.steps + 1)]
    results = []
    with env_factory(cfg)() as env:
        results.append(measure("hf", HFBackend(policy, tokenizer, batch_size=cfg.rollout.generate_batch_size), env,
                               tokenizer, tasks, rollout_cfg, cfg, args.steps))
        vllm_cfg = cfg.copy()
        vllm_cfg.rollout.backend = "vllm"
        results.append(measure("vllm", backend_factory(vllm_cfg)(policy, tokenizer), env, tokenizer, tasks,
                               rollout_cfg, cfg, args.steps))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n[generated games] {cfg.tasks_per_step} tasks x group {cfg.group_size}, {args.steps} timed batches; "
          f"commit {commit}, {platform.processor() or platform.machine()}, overrides {overrides or 'none'}")
    print("| backend | generated tokens/s | rollout s / step (median) | env share of rollout |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['tokens_per_s']:.0f} | {r['rollout_s']:.2f} | {r['env_share']:.2f} |")
    hf, vl = results
    print(f"vLLM / HF: tokens/s x{vl['tokens_per_s'] / hf['tokens_per_s']:.2f}, rollout s x{vl['rollout_s'] / hf['rollout_s']:.2f}")


if __name__ == "__main__":
    main()
