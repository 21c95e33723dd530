"""One training step of the CPU main job by phase: rollout (generation / environment), teacher rescoring, PPO update.

`rollout` rolls out training batches exactly as `python train.py experiment=alfworld_heat machine=cpu` does
(its config, the cached SFT policy under `paths.cache_dir`, the same task order and seeds), prints each
batch's phase times and saves the batches. `update` times, on saved batches, what a step does after its
rollout: the teacher's rescoring and the PPO update (one pass of `mini_batch_rows` mini-batches through
`GRPOModule.accumulate`, gradient clipping and an AdamW step each), with the config of the checkout the code
is imported from. The script uses only long-standing APIs, so the same saved batches can be timed on an
older checkout in the same command, pair by pair (whole steps: the `time/*` columns of a run's
`csv/version_0/metrics.csv`). Usage:
    python experiments/benchmarks/train_step_speed.py rollout --out /tmp/batches.pt --steps 3
    python experiments/benchmarks/train_step_speed.py update --batches /tmp/batches.pt
    PYTHONPATH=/path/to/old/checkout python experiments/benchmarks/train_step_speed.py update --batches /tmp/batches.pt
Extra arguments are Hydra overrides (e.g. algorithm.ppo.micro_batch_tokens=0).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

import stepopsd
import stepopsd.launch  # noqa: F401  registers the config's resolvers
import stepopsd.schemas  # noqa: F401  the typed schemas conf/ composes on
from stepopsd.module import GRPOModule
from stepopsd.estimators import Context, Services
from stepopsd.build import build_policy, env_factory, load_split, prepare_data
from stepopsd.config import check_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(stepopsd.__file__))), "conf")


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["experiment=alfworld_heat", "machine=cpu", *overrides])


def setup(overrides: list[str]):
    cfg = config(overrides)
    ppo, estimator, rollout_cfg = check_config(cfg)
    data = prepare_data(cfg)
    tasks = load_split(cfg, data, cfg.data.train_split, cfg.data.task_types)
    policy, tokenizer = build_policy(cfg, data, tasks)
    return cfg, ppo, estimator, rollout_cfg, tasks, policy, tokenizer


def rollouts(args, overrides: list[str]) -> None:
    from stepopsd.data.datamodule import RolloutDataModule
    from stepopsd.policy.backends.hf import HFBackend

    cfg, ppo, _, rollout_cfg, tasks, policy, tokenizer = setup(overrides)
    dm = RolloutDataModule(tasks, env_factory(cfg), lambda p, t: HFBackend(p, t, batch_size=cfg.rollout.generate_batch_size),
                           tokenizer, rollout_cfg, tasks_per_step=cfg.tasks_per_step, seed=cfg.seed)
    dm.attach(policy)
    batches, rows = [], []
    try:
        for _ in range(args.steps):
            batches.append(dm.next_batch())
            rows.append({k: dm.last_metrics[k] for k in ("time/rollout_s", "time/generate_s", "time/env_s")})
            print(f"rows {batches[-1].num_rows}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()), flush=True)
    finally:
        dm.teardown("fit")
    summary(rows, f"rollout, {stepopsd.__file__}")
    torch.save(batches, args.out)


def updates(args, overrides: list[str]) -> None:
    cfg, ppo, estimator, _, _, policy, tokenizer = setup(overrides)
    batches = torch.load(args.batches, weights_only=False)
    sft = copy.deepcopy(policy.state_dict())
    module = GRPOModule(policy, ppo)  # the KL reference: the SFT policy, as at the start of a run
    estimator.setup(policy, Services(tokenizer=tokenizer, temperature=ppo.temperature))  # a teacher: the SFT policy too
    rows = []
    for i, batch in enumerate(batches):
        policy.load_state_dict(sft)  # every batch is updated from the SFT policy
        batch = type(batch)(**vars(batch))  # rescoring writes the advantages back
        t0 = time.perf_counter()
        batch.advantages = estimator.advantages(batch, Context(step=i, policy=policy)).tokens  # StepOPSD: the teacher
        t1 = time.perf_counter()
        opt = torch.optim.AdamW(policy.parameters(), lr=ppo.lr)
        policy.train()
        order = torch.randperm(batch.num_rows, generator=torch.Generator().manual_seed(i))
        for index in torch.tensor_split(order, -(-batch.num_rows // ppo.mini_batch_rows)):
            opt.zero_grad(set_to_none=True)
            module.accumulate(batch, index)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), ppo.max_grad_norm)
            opt.step()
        rows.append({"time/rescore_s": t1 - t0, "time/update_s": time.perf_counter() - t1})
        print(f"rows {batch.num_rows}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()), flush=True)
    summary(rows, f"update, {stepopsd.__file__}, micro_batch_tokens={ppo.micro_batch_tokens}")


def summary(rows: list[dict], what: str) -> None:
    print(f"median over {len(rows)} batches ({what}): "
          + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f}" for k in rows[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="phase", required=True)
    r = sub.add_parser("rollout", help="roll out and save training batches")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=3)
    u = sub.add_parser("update", help="time rescoring and the PPO update on saved batches")
    u.add_argument("--batches", required=True)
    args, overrides = p.parse_known_args()
    torch.manual_seed(0)
    (rollouts if args.phase == "rollout" else updates)(args, overrides)


if __name__ == "__main__":
    main()
