"""The one error type for problems the user can fix: a bad knob, missing or malformed data, a model folder
without a tokenizer, a corrupt checkpoint, a retriever at a wrong URL.

Raise `UserError` (or a subclass) with ONE line that says what is wrong and how to fix it. The entry points
(`train.py`, `eval.py`, `sft.py`, the console scripts) catch it through `main_guard` and print
`<prog>: error: <line>` with exit status 2: no Hydra banner, no traceback. `STEPOPSD_DEBUG=1` re-raises it
with the full traceback instead. Anything else is a bug (or a fault the run could not survive) and keeps
its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys


class UserError(Exception):
    """Something the user can fix; its message is one line: what is wrong, and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the caller formatted


def debug() -> bool:
    """`STEPOPSD_DEBUG=1`: user errors keep their traceback (for reporting a confusing one)."""
    return os.environ.get("STEPOPSD_DEBUG", "").lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def main_guard(prog: str, *, reraise: bool = False):
    """Around an entry point's body: a `UserError` becomes `<prog>: error: <line>` on stderr and exit 2.
    `reraise` (an Optuna trial: the sweeper records the error and decides) or STEPOPSD_DEBUG passes it on."""
    try:
        yield
    except UserError as e:
        if reraise or debug():
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
