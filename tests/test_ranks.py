"""Several ranks holding different rows train as one process on the union of their rows (issue 19, item 1).

Two gloo processes hold deliberately uneven rows: rank 0 eight rows with long responses, rank 1 three short ones
(about 4x fewer loss tokens), split into different numbers of micro-batches. After one update, under torch's
DistributedDataParallel and under FSDP2 (`fully_shard`, as trainer=fsdp), the weights must equal those of a
single process (this test's own, no process group) updating on the union of both ranks' rows, for every
aggregation mode of Eq. 14: the loss normaliser is the union's, and DDP's / FSDP's gradient averaging must not
weigh a short rank's tokens more. Two layouts: one optimizer step over all rows, and two optimizer steps
(`mini_batch_rows` is the global mini-batch: step i trains on the union of every rank's part i).
"""
import os
import re

import torch

from stepopsd.algorithms.grpo import AGGREGATIONS

from helpers.batches import synthetic_batch
from helpers.dist import free_port, shard, tiny_qwen3

VOCAB = 64
ROWS = {0: [(6, 12), (3, 14), (9, 10), (4, 13), (7, 11), (2, 15), (5, 12), (8, 9)],  # 96 response tokens
        1: [(11, 3), (4, 2), (6, 4)]}  # 9 response tokens
LAYOUTS = {"one_step": 16, "two_steps": 6}  # mini_batch_rows: ceil(11 / 16) = 1, ceil(11 / 6) = 2 optimizer steps


def _module(agg: str, mini_batch_rows: int, sharding=None):
    from stepopsd.module import GRPOModule, PPOConfig

    ppo = PPOConfig(lr=1e-3, agg=agg, kl_coef=0.05, entropy_coef=0.01, mini_batch_rows=mini_batch_rows,
                    micro_batch_tokens=60, max_grad_norm=1e3, logp_gap_threshold=1e9)
    module = GRPOModule(tiny_qwen3(), ppo, sharding=sharding)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in module.reference.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    return module


def _weights(module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in module.policy.parameters()]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stepopsd.policy.sharding import ShardingConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = synthetic_batch(VOCAB, ROWS[rank], seed=rank)
        result = {}
        for agg in AGGREGATIONS:
            for layout, mini in LAYOUTS.items():
                ddp = _module(agg, mini)
                ddp.policy = DistributedDataParallel(ddp.policy)  # averages gradients over the ranks, as trainer=ddp
                ddp.update(batch, ddp.configure_optimizers()["optimizer"])
                fsdp = shard(_module(agg, mini, ShardingConfig()), world)
                fsdp.update(batch, fsdp.configure_optimizers()["optimizer"])
                result[agg, layout] = {"ddp": _weights(ddp), "fsdp": _weights(fsdp)}
        if rank == 0:
            torch.save(result, os.path.join(out, "ranks.pt"))
    finally:
        dist.destroy_process_group()


def _union_update(agg: str, mini: int) -> list[torch.Tensor]:
    """One process, no process group: the same update on the union of both ranks' rows, optimizer step i on the
    union of each rank's part i of its own shuffled rows (the split every rank makes, `GRPOModule.update`)."""
    import dataclasses

    from stepopsd.data.batch import RolloutBatch

    parts = [synthetic_batch(VOCAB, ROWS[r], seed=r) for r in (0, 1)]
    width = max(b.input_ids.shape[1] for b in parts)

    def joined(name: str):
        values = [getattr(b, name) for b in parts]
        if not isinstance(values[0], torch.Tensor):
            return values[0]
        fill = -1 if name == "step_ids" else 0  # right padding as build_batch pads
        return torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) if v.dim() == 2 else v
                          for v in values])

    union = RolloutBatch(**{f.name: joined(f.name) for f in dataclasses.fields(RolloutBatch)})
    steps = -(-sum(len(v) for v in ROWS.values()) // mini)
    offsets = [0, len(ROWS[0])]
    splits = [torch.tensor_split(torch.randperm(len(ROWS[r]), generator=torch.Generator().manual_seed(0)), steps)
              for r in (0, 1)]
    module = _module(agg, mini)
    opt = module.configure_optimizers()["optimizer"]
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        module.accumulate(union, torch.cat([splits[r][i] + offsets[r] for r in (0, 1)]))
        module._clip_gradients()
        opt.step()
    return _weights(module)


def test_uneven_ranks_update_like_one_process_on_the_union_of_their_rows(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = torch.load(tmp_path / "ranks.pt")
    start = _weights(_module("token_mean", 16))
    for agg in AGGREGATIONS:
        for layout, mini in LAYOUTS.items():
            union = _union_update(agg, mini)
            moved = max((u - s).abs().max().item() for u, s in zip(union, start))
            assert moved > 1e-4, (agg, layout)  # lr 1e-3: the update moved the weights
            for kind in ("ddp", "fsdp"):
                diff = max((w - u).abs().max().item() for w, u in zip(ranks[agg, layout][kind], union))
                assert diff <= 1e-3 * moved, (agg, layout, kind, diff, moved)


# --- one stop for all ranks (issue 19, item 5) ----------------------------------------------------------------------

def _decisions_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 alone sees a stale engine, a non-finite loss, a broken environment and a failed teacher; every
    decision must come out the same on both ranks."""
    import torch.distributed as dist

    from stepopsd import ranks
    from stepopsd.module import LogpGapError, NonFiniteError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _module("token_mean", 16)
        module.ppo = type(module.ppo)(**{**module.ppo.__dict__, "logp_gap_threshold": 0.05, "max_nonfinite_updates": 2})
        logp = torch.zeros(1, 10 if rank == 0 else 4)
        stale = logp + (1.0 if rank == 1 else 0.0)  # rank 1: 4 tokens off by 1 -> the union's mean gap 4/14
        seen = {}
        try:
            module._check_logp_gap(logp, stale, torch.ones_like(logp), {})
        except LogpGapError as e:
            seen["gap"] = str(e)
        bad = float("nan") if rank == 1 else 1.0
        out_ = {"pg_loss": torch.tensor(bad), "entropy": torch.tensor(1.0)}
        metrics = {}
        seen["finite"] = module._finite_update(out_, torch.tensor(1.0), metrics)
        try:
            module._finite_update(out_, torch.tensor(1.0), metrics)
        except NonFiniteError as e:
            seen["nonfinite"] = str(e)
        seen["problem"] = ranks.agreed_problem("env broken" if rank == 1 else None)
        seen["none"] = ranks.agreed_problem(None)
        torch.save(seen, os.path.join(out, f"decisions{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_run_stopping_decision_is_the_same_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_decisions_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"decisions{r}.pt") for r in (0, 1))
    assert zero == one
    assert "differ by 0.2857 per token" in zero["gap"]  # 4 tokens off by 1 over 14 tokens, reduced over ranks
    assert zero["finite"] is False and "2 PPO updates in a row" in zero["nonfinite"]
    assert zero["problem"] == "rank 1: env broken" and zero["none"] is None


def test_one_broken_rank_stops_both_ranks_with_one_line(generated_games, tmp_path_factory):
    """The real train.py under Lightning's launcher (2 gloo processes): rank 1's env workers crash on every batch
    (STEPOPSD_TEST_ENV_FAULTS limited to rank 1 by STEPOPSD_TEST_FAULT_RANK), rank 0's are healthy. Both ranks
    stop in step 1 with the same line and the job exits 2 within seconds, not at the process group's timeout."""
    import time

    from helpers.runs import run_train, tiny_overrides

    cache, out = tmp_path_factory.getbasetemp() / "tiny-cache", tmp_path_factory.mktemp("one-stop")
    start = time.monotonic()
    proc = run_train("experiment=alfworld_heat", "machine=cpu", *tiny_overrides(str(generated_games[0]), cache, out),
                     "trainer.strategy=ddp", "trainer.devices=2", "env.num_workers=1", "val_every=0",
                     env={"STEPOPSD_TEST_ENV_FAULTS": "crash:1.0", "STEPOPSD_TEST_FAULT_RANK": "1"})
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = re.findall(r"train\.py: error: .*?resume with resume=auto", proc.stderr)  # the ranks share one stderr
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]  # one line from each rank, the same
    assert lines[0].startswith("train.py: error: training step 1: rank 1:") and "max_failed_fraction" in lines[0]
    assert "Traceback" not in proc.stderr
    assert seconds < 240  # a hang would wait for the 30-minute process-group timeout
