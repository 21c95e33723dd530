"""Fault injection for the reliability tests: environment variables that no config sets.

They let a test kill a real run at a chosen point, or make its environment workers fail, to prove that the
run resumes exactly (`stepopsd/checkpoints.py`) or survives (`rollout/failed_trajectories`). Unset, every
hook is one dictionary lookup.

    STEPOPSD_TEST_KILL_AT=<point>:<step>[:TERM|:USR1]   SIGKILL this process (:TERM / :USR1: send that
        signal to its process group, as SLURM pre-empts a job) at <point> of training step <step> (1-based):
        rollout   after the step's first generate call
        rescore   inside the teacher's rescoring, before the advantages are written back
        update    after the first micro-batch's backward, before the optimizer step
        save      inside the checkpoint write of that step, the new file half written
    STEPOPSD_TEST_ENV_FAULTS=crash:<p>,hang:<p>[,seed:<n>]   every batch an env worker runs (resets and
        steps) crashes that worker (the process exits) with probability p; a batch of steps hangs it past its
        timeout with probability p. The pool draws these per batch it sends, from one stream seeded with n
        (default 0), so a run that sends the same batches gets the same faults every time.
    STEPOPSD_TEST_FAULT_RANK=<r>   the two knobs above act in the process of global rank r only (a multi-rank
        run with one sabotaged rank: every rank must still stop together, `stepopsd.ranks`).
"""
from __future__ import annotations

import os
import random
import signal
import time

KILL_POINTS = ("rollout", "rescore", "update", "save")


def _this_rank() -> bool:
    """Whether the fault knobs act in this process (STEPOPSD_TEST_FAULT_RANK unset, or naming its global rank)."""
    chosen = os.environ.get("STEPOPSD_TEST_FAULT_RANK")
    if not chosen:
        return True
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == int(chosen)
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == int(chosen)


def _kill_at() -> tuple[str, int, str] | None:
    spec = os.environ.get("STEPOPSD_TEST_KILL_AT")
    if not spec or not _this_rank():
        return None
    point, step, sig = (spec.split(":") + ["KILL"])[:3]
    if point not in KILL_POINTS or not step.isdigit() or sig not in ("KILL", "TERM", "USR1"):
        raise ValueError(f"STEPOPSD_TEST_KILL_AT={spec!r}: use <point>:<step>[:TERM|:USR1] with a point of "
                         f"{', '.join(KILL_POINTS)}")
    return point, int(step), sig


def maybe_kill(point: str, step: int, file=None) -> None:
    """Signal this process when STEPOPSD_TEST_KILL_AT names this point and training step. At `save`, the
    temporary file being written (`file`) is first cut to half its length: a torn write."""
    target = _kill_at()
    if target is None or target[:2] != (point, step):
        return
    if target[2] != "KILL":  # pre-emption: the whole job (process group) when this process leads one
        sig = getattr(signal, f"SIG{target[2]}")
        print(f"[fault injection] SIG{target[2]} at {point} of training step {step}", flush=True)
        os.killpg(0, sig) if os.getpgrp() == os.getpid() else os.kill(os.getpid(), sig)
        return
    if file is not None:
        file.flush()
        file.truncate(max(1, file.tell() // 2))
        file.flush()
    print(f"[fault injection] SIGKILL at {point} of training step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def env_faults() -> dict[str, float]:
    """{'crash': p, 'hang': p, 'seed': n} from STEPOPSD_TEST_ENV_FAULTS (empty when unset)."""
    spec = os.environ.get("STEPOPSD_TEST_ENV_FAULTS", "") if _this_rank() else ""
    out = {}
    for part in filter(None, spec.split(",")):
        kind, _, value = part.partition(":")
        try:
            out[kind] = int(value) if kind == "seed" else float(value)
        except ValueError:
            kind = ""
        if kind not in ("crash", "hang", "seed"):
            raise ValueError(f"STEPOPSD_TEST_ENV_FAULTS={spec!r}: use crash:<p>,hang:<p>[,seed:<n>]")
    return out


_draws: random.Random | None = None  # the pool's fault stream, seeded on first use


def draw_worker_fault(op: str) -> str:
    """In the pool, for each batch it sends a worker: '' (no fault), 'crash' or 'hang' (batches of steps only),
    as STEPOPSD_TEST_ENV_FAULTS says; the worker acts it out (`act_worker_fault`)."""
    global _draws
    faults = env_faults()
    if not faults:
        return ""
    if _draws is None:
        _draws = random.Random(faults.get("seed", 0))
    u = _draws.random()
    if u < faults.get("crash", 0.0):
        return "crash"
    if op == "step" and u < faults.get("crash", 0.0) + faults.get("hang", 0.0):
        return "hang"
    return ""


def act_worker_fault(fault: str, hang_seconds: float = 3600.0) -> None:
    """In an env worker, before it runs a batch: crash, or hang, as the pool drew (`draw_worker_fault`)."""
    if fault == "crash":
        os._exit(70)  # what a segfaulting engine looks like to the parent: EOF on the pipe
    if fault == "hang":
        time.sleep(hang_seconds)  # the parent's deadline kills and replaces this worker
