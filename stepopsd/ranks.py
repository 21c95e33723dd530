"""Values agreed on by every data-parallel rank: the few collectives the trainer's decisions need.

Two things must be the same on every rank of `trainer=ddp` / `trainer=fsdp` (torch.distributed's default
group, which is the data-parallel group here: tensor parallelism is 1):

- **Loss normalisers** (`GRPOModule.accumulate`): a mini-batch's token or row count is the union's, summed
  over ranks, so that DDP's / FSDP's gradient *averaging* yields the gradient of one pass over all ranks' rows
  (verl's `agg_loss` with its data-parallel size).
- **Run-stopping decisions** (the log-prob gap, non-finite updates, env failures, a failed teacher pass): each
  is taken on values reduced across ranks, so all ranks raise the same one-line error in the same step instead
  of one rank stopping while the others wait in their next collective until the process group times out.

Without an initialised process group (one process, the tests' plain modules) every function returns its input:
no communication, bit-identical single-process runs. Tensors travel on the backend's device (CUDA under NCCL)
and come back on the caller's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def world_size() -> int:
    """The default group's size (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce(values, op: str = "sum") -> torch.Tensor:
    """`values` (a tensor or a list of numbers) reduced element-wise over all ranks with op sum | max | min, as a
    float64 tensor on the input's device (numbers: CPU). Without a group: the values themselves."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if world_size() < 2:
        return t.double()
    out = t.detach().double().to(_comm_device())
    dist.all_reduce(out, op=OPS[op])
    return out.to(t.device)


def gather(values: list[float]) -> torch.Tensor:
    """Every rank's `values` (the same length on every rank) as a [world, len] float64 CPU tensor, row r from rank
    r. Without a group: [1, len]."""
    row = torch.tensor(values, dtype=torch.float64)
    if world_size() < 2:
        return row[None]
    table = torch.zeros(world_size(), len(values), dtype=torch.float64, device=_comm_device())
    table[rank()] = row.to(table.device)
    dist.all_reduce(table)  # each rank fills its own row: a sum is an all-gather
    return table.cpu()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer)."""
    return bool(reduce([float(flag)], "max")[0] > 0)


def agreed_problem(problem: str | None) -> str | None:
    """A run-stopping problem found on any rank, the same text on every rank: None when no rank has one, else the
    lowest such rank's text ("rank r: ..." when there are several ranks; one process: the text itself)."""
    if world_size() < 2:
        return problem
    if not any_rank(problem is not None):  # the usual case: one scalar all-reduce, no pickled objects
        return None
    found = [None] * world_size()
    dist.all_gather_object(found, problem)
    bad = [(r, p) for r, p in enumerate(found) if p is not None]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more rank{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return f"rank {bad[0][0]}{more}: {bad[0][1]}"
