"""The one error type for problems the user can fix: a bad knob, missing or malformed data, a model folder
without a tokenizer, a corrupt checkpoint, a retriever at a wrong URL.

Raise `UserError` (or a subclass) with ONE line that says what is wrong and how to fix it. The entry points
`train.py`, `eval.py` and `sft.py` catch it through `main_guard` (inside the task function) and `hydra_entry`
(Hydra's own composition errors, and errors raised by a sweeper), the console scripts in their `main()`, and
print `<prog>: error: <line>` with exit status 2: no Hydra banner, no traceback. `STEPOPSD_DEBUG=1` re-raises it
with the full traceback instead. Anything else is a bug (or a fault the run could not survive) and keeps
its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time


class UserError(Exception):
    """Something the user can fix; its message is one line: what is wrong, and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the caller formatted


class RunFailed(UserError):
    """A run stopped by faults past its limit (non-finite updates in a row, a broken environment): one line, as a
    user error; in a sweep the trial is recorded FAIL and the sweep goes on (a diverging learning rate is a
    result, not a bad config)."""


class ForeignFolderError(UserError):
    """A generator pointed at a non-empty folder it did not write."""


def refuse_foreign_folder(out: str, own: bool, tool: str) -> None:
    """A generator writes only into a new or empty folder, or one that holds its own earlier output (`own`),
    so that it never overwrites or mixes with someone's data."""
    if os.path.isdir(out) and os.listdir(out) and not own:
        raise ForeignFolderError(f"{out} is not empty and not a folder {tool} wrote: choose a new or empty folder "
                                 "(nothing was written)")


def debug() -> bool:
    """`STEPOPSD_DEBUG=1`: user errors keep their traceback (for reporting a confusing one)."""
    return os.environ.get("STEPOPSD_DEBUG", "").lower() not in ("", "0", "false", "no")


def one_line(message: str) -> str:
    """A multi-line library message (Hydra's) as one line: an indented list after a `...:` line becomes a comma
    list, OmegaConf's `full_key:` / `object_type=` detail and Hydra's search path and trace hint are dropped."""
    parts: list[str] = []
    for raw in str(message).split("Config search path:")[0].splitlines():
        line = raw.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "Set the environment variable")):
            continue
        if parts and raw[:1] == "\t" and (parts[-1].endswith(":") or parts[-1].endswith(",")):
            parts[-1] += f" {line},"
        else:
            parts.append(line)
    text = ""
    for part in (p.rstrip(",") for p in parts):
        text += part if not text else (" " if text.endswith((".", ":")) else "; ") + part
    return " ".join(text.split())


def hydra_entry(main, prog: str) -> None:
    """Run a `@hydra.main` entry point so that Hydra's own errors (an unknown experiment or group option, a
    misspelt key, a malformed override) and user errors raised outside the task function (a bad sweep config)
    are one line too, `<prog>: error: ...` with exit status 2. STEPOPSD_DEBUG=1 or HYDRA_FULL_ERROR=1: the
    full traceback, as Hydra gives it."""
    from hydra.errors import HydraException

    verbose = debug() or os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its page; the line is printed here
    try:
        main()
    except (HydraException, UserError) as e:
        if verbose:
            raise
        cause = f" ({one_line(e.__cause__)})" if isinstance(e, HydraException) and e.__cause__ is not None else ""
        print(f"{prog}: error: {one_line(e)}{cause}", file=sys.stderr, flush=True)
        sys.exit(2)


@contextlib.contextmanager
def main_guard(prog: str, *, reraise: bool = False):
    """Around an entry point's body: a `UserError` becomes `<prog>: error: <line>` on stderr and exit 2.
    `reraise` (an Optuna trial: the sweeper records the error and decides) or STEPOPSD_DEBUG passes it on."""
    try:
        yield
    except UserError as e:
        if reraise or debug():
            raise
        outlive_rank_zero()  # a child rank under Lightning's launcher: rank 0 prints and exits first
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def outlive_rank_zero(timeout: float = 60.0) -> None:
    """Under Lightning's own launcher (`trainer.strategy=ddp trainer.devices=N`, no torchrun / srun) rank 0 is the
    parent of the other ranks, and its child-process observer SIGKILLs rank 0 a few seconds after any child exits
    non-zero. Every rank raises a run-stopping error in the same step (`stepopsd.ranks`), so a child rank that
    stops waits (at most `timeout` s) for its parent to exit first: rank 0 then prints its own line and exits 2
    instead of being killed mid-teardown, and the child's line follows it (not interleaved on a shared stderr).
    Elsewhere a no-op."""
    lightning_child = os.environ.get("LOCAL_RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" not in os.environ \
        and "SLURM_PROCID" not in os.environ
    if not lightning_child:
        return
    parent, deadline = os.getppid(), time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.1)
