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

import pytest
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


# --- an estimator's loss term and its teacher fallback under several ranks (issue 21) --------------------------------

DISTILL = {"sdar": (0.5, 5.0, 1.0), "opsd": (1.0, 5.0, 0.0)}  # (coef, gate_beta, pg_coef): SDAR-like, OPSD-like


def _distill_batch(rank: int, term: tuple):
    """The uneven rows of rank `rank` with a teacher's log-probs on every response token (the target span) and the
    estimator's loss term, as the advantage stage hands them to the update."""
    import dataclasses

    from stepopsd.algorithms.distill import DistillTerm

    batch = synthetic_batch(VOCAB, ROWS[rank], seed=rank)
    g = torch.Generator().manual_seed(10 + rank)
    teacher = (batch.rollout_logp + torch.randn(batch.rollout_logp.shape, generator=g)) * batch.loss_mask
    return dataclasses.replace(batch, step_ids=torch.where(batch.loss_mask > 0, 0, -1), teacher_logp=teacher,
                               distill=DistillTerm(*term))


def _distill_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stepopsd.estimators import Context, Services, build_estimator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for name, term in DISTILL.items():
            for agg in ("token_mean", "seq_mean_token_sum_norm"):
                module = _module(agg, LAYOUTS["two_steps"])
                module.policy = DistributedDataParallel(module.policy)
                metrics = module.update(_distill_batch(rank, term), module.configure_optimizers()["optimizer"])
                losses = metrics["actor/distill_loss"]  # per mini-batch, this rank's share x world
                result[name, agg] = (_weights(module), sum(losses) / len(losses))
        # the teacher pass fails on rank 1 alone (a context too long, out of memory): both ranks fall back together
        est = build_estimator({"name": "sdar"})
        est.setup(torch.nn.Linear(2, 2), Services())

        def score(teacher):
            if rank == 1:
                raise RuntimeError("out of memory on rank 1\nmore detail")
            return "scored"

        outcome, error, metrics = est.with_teacher(Context(step=3, policy=torch.nn.Linear(2, 2)), score)
        result["fallback"] = (outcome, error, {k: v for k, v in metrics.items() if not k.startswith("time/")})
        torch.save(result, os.path.join(out, f"distill{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _union_distill_update(agg: str, term: tuple) -> tuple[list[torch.Tensor], float]:
    """One process: the same update on the union of both ranks' rows (as `_union_update`), with the loss term."""
    import dataclasses

    from stepopsd.data.batch import RolloutBatch

    parts = [_distill_batch(r, term) for r in (0, 1)]
    width = max(b.input_ids.shape[1] for b in parts)

    def joined(name: str):
        values = [getattr(b, name) for b in parts]
        if not isinstance(values[0], torch.Tensor):
            return values[0]
        fill = -1 if name == "step_ids" else 0
        return torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) if v.dim() == 2 else v
                          for v in values])

    union = RolloutBatch(**{f.name: joined(f.name) for f in dataclasses.fields(RolloutBatch)})
    mini = LAYOUTS["two_steps"]
    steps = -(-sum(len(v) for v in ROWS.values()) // mini)
    splits = [torch.tensor_split(torch.randperm(len(ROWS[r]), generator=torch.Generator().manual_seed(0)), steps)
              for r in (0, 1)]
    module = _module(agg, mini)
    opt = module.configure_optimizers()["optimizer"]
    distill = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        parts_i = module.accumulate(union, torch.cat([splits[0][i], splits[1][i] + len(ROWS[0])]))
        distill.append(float(parts_i["distill_loss"]))
        module._clip_gradients()
        opt.step()
    return _weights(module), sum(distill) / len(distill)


def test_an_estimators_loss_term_and_teacher_fallback_agree_across_uneven_ranks(tmp_path):
    """SDAR's and OPSD's self-distillation term under DDP with rank 0 holding 96 target tokens and rank 1 nine:
    the weights after the update equal one process's on the union of the rows (the term is normalised by the
    union's count, like the surrogate); the ranks' mean of the logged distill loss (what `sync_dist` logs) is the
    union's. A teacher pass that fails on rank 1
    alone makes both ranks fall back for the batch, with the same error line and the same metrics."""
    import torch.multiprocessing as mp

    mp.spawn(_distill_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"distill{r}.pt") for r in (0, 1))
    start = _weights(_module("token_mean", 16))
    for name, term in DISTILL.items():
        for agg in ("token_mean", "seq_mean_token_sum_norm"):
            union, union_loss = _union_distill_update(agg, term)
            moved = max((u - s).abs().max().item() for u, s in zip(union, start))
            assert moved > 1e-4, (name, agg)
            for got in (zero, one):
                diff = max((w - u).abs().max().item() for w, u in zip(got[name, agg][0], union))
                assert diff <= 1e-3 * moved, (name, agg, diff, moved)
            assert zero[name, agg][1] != pytest.approx(one[name, agg][1], rel=1e-3)  # the ranks' shares differ
            assert (zero[name, agg][1] + one[name, agg][1]) / 2 == pytest.approx(union_loss, rel=1e-4), (name, agg)
    assert zero["fallback"] == one["fallback"]
    outcome, error, metrics = zero["fallback"]
    assert outcome is None and error == "rank 1: RuntimeError: out of memory on rank 1"
    assert metrics["sdar/rescoring_failed"] == 1.0 and metrics["sdar/teacher_age"] == 3
