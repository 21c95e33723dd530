"""A pool of worker processes that host environment engines ("slots") and step them in parallel.

Text game engines are slow (10-100 steps/s) and occasionally hang or crash, so the rollout loop
keeps many slots live at once and steps them through this pool.  Design:

* Slot ``i`` of the last ``reset`` lives on worker ``i % num_workers``.  Each worker process
  owns one engine per slot it hosts (built by ``engine_factory()`` the first time the slot is
  reset on that process, reused by later resets) and runs its slots sequentially.
* Per call the parent sends one message per worker (all of that worker's commands in one batch)
  over a ``multiprocessing.Pipe``, then waits on every pipe at once with
  ``multiprocessing.connection.wait`` under a single deadline: ``step_timeout`` (for resets
  ``reset_timeout``, default ``step_timeout``; it includes the start-up of a fresh worker) bounds
  each worker's whole batch.  Workers therefore run fully in parallel, so a call takes as long as
  the slowest worker's batch; use about one worker per core.
* An engine exception fails only that slot; the worker lives on.  A worker that dies (EOF on its
  pipe) or misses the deadline is killed and replaced by a fresh process at once: the slots it was
  running in that call come back failed, and every slot it hosted is dead until the next
  ``reset``.  A failed slot is dead too: stepping it returns a failed result at once without
  contacting any worker.  ``num_failures`` counts slots that went from live to failed (each once
  per reset), ``worker_restarts`` counts replaced processes.  If the caller is interrupted (e.g.
  Ctrl-C) mid-call, the workers still busy are replaced so no stale reply is read later.
* Workers are started with ``spawn`` by default so they do not inherit the parent's (possibly
  huge) memory.  So ``engine_factory`` must be picklable and importable in a fresh interpreter,
  and a script that builds a pool needs the ``if __name__ == "__main__":`` guard (without it the
  workers die at start-up and ``reset`` reports every slot crashed).  Workers are daemonic,
  ignore SIGINT, SIGTERM and SIGUSR1 (the parent shuts them down), exit on EOF from the parent, and are stopped by
  ``close()`` (or a ``with`` block), by garbage collection of the pool, and at interpreter exit;
  one that does not stop within a second is killed.  An engine's ``close()``, if it has one, is
  called when its slot is dropped by a reset or its worker stops.
* ``num_workers=0`` runs the engines in the calling process with the same API and semantics but
  no isolation: no timeout, and an engine that crashes or hangs takes the caller with it.  Use it
  for debugging and as the single-process baseline.  Only then may payloads be unpicklable.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  its exit hook is registered now, so `_stop_live_pools` (later) runs before it
import pickle
import signal
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

from stepopsd.faults import act_worker_fault, draw_worker_fault

__all__ = ["Engine", "EnvWorkerPool", "SlotResult"]
_VERB = {"step": "stepping", "reset": "resetting"}


class Engine(Protocol):
    def reset(self, source: str) -> Any: ...
    def step(self, command: str) -> Any: ...


@dataclass(frozen=True)
class SlotResult:
    slot: int
    payload: Any  # what the engine returned; None if failed
    failed: bool
    error: str = ""  # one line; empty unless failed
    seconds: float = 0.0  # engine time spent on this slot in this call


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _drop_engines(engines: dict, keep: set | frozenset = frozenset()) -> None:
    """Forget engines of slots not in `keep`, calling their close() if they have one."""
    for slot in [s for s in engines if s not in keep]:
        try:
            getattr(engines.pop(slot), "close", lambda: None)()
        except Exception:
            pass


def _run_batch(engines: dict, factory: Callable[[], Engine], op: str, items: list) -> list:
    """Run one batch of (slot, arg) on `engines`; returns [(slot, payload, error|None, seconds)]."""
    if op == "reset":  # a reset lists every slot this process hosts from now on
        _drop_engines(engines, {slot for slot, _ in items})
    out = []
    for slot, arg in items:
        t0 = time.perf_counter()
        try:
            if op == "reset" and slot not in engines:
                engines[slot] = factory()
            payload = engines[slot].reset(arg) if op == "reset" else engines[slot].step(arg)
            out.append((slot, payload, None, time.perf_counter() - t0))
        except Exception as exc:
            out.append((slot, None, _one_line(f"{type(exc).__name__}: {exc}"), time.perf_counter() - t0))
    return out


def _picklable(result: tuple) -> tuple:
    try:
        pickle.dumps(result[1])
        return result
    except Exception as exc:
        return (result[0], None, _one_line(f"unpicklable payload: {type(exc).__name__}: {exc}"), result[3])


def _worker_main(conn, factory: Callable[[], Engine]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # Ctrl-C, and SLURM's pre-emption signals to the
        signal.signal(sig, signal.SIG_IGN)  # whole job, are the parent's business: it saves, then closes the workers
    engines: dict = {}
    while True:
        try:
            op, items, fault = conn.recv()
        except (EOFError, OSError):  # the parent went away
            op = "close"
        if op == "close":
            return _drop_engines(engines)
        act_worker_fault(fault)  # tests only (STEPOPSD_TEST_ENV_FAULTS): crash or hang here
        results = _run_batch(engines, factory, op, items)
        try:
            conn.send(results)
        except (pickle.PicklingError, TypeError, AttributeError):  # nothing was written yet
            conn.send([_picklable(r) for r in results])


class _Worker(NamedTuple):
    proc: Any
    conn: Any


def _stop_workers(workers: list, grace: float = 1.0) -> None:
    for w in workers:
        try:
            w.conn.send(("close", None, ""))
        except Exception:
            pass
    deadline = time.monotonic() + grace
    for w in workers:
        w.proc.join(max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(1.0)
        w.conn.close()
    workers.clear()


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every pool not yet garbage-collected


@atexit.register
def _stop_live_pools() -> None:
    """At interpreter exit, before multiprocessing's own hook: that one joins daemonic children after a SIGTERM
    they ignore (pre-emption is the parent's business), so a pool still open (a run that died on an exception)
    would hang the exit. Its workers are told to close, and killed after a second."""
    for pool in list(_LIVE):
        pool.close()


class EnvWorkerPool:
    """Steps many engine slots on `num_workers` processes; see the module docstring."""

    def __init__(self, engine_factory: Callable[[], Engine], num_workers: int, *, step_timeout: float = 60.0,
                 start_method: str = "spawn", reset_timeout: float | None = None):
        if not callable(engine_factory):
            raise ValueError("engine_factory must be a callable returning an engine (e.g. the engine class)")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 = in-process, no isolation), got {num_workers!r}")
        for name, value in (("step_timeout", step_timeout), ("reset_timeout", reset_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method must be one of {mp.get_all_start_methods()}, got {start_method!r}")
        self.num_workers = num_workers
        self.step_timeout = float(step_timeout)
        self.reset_timeout = float(reset_timeout if reset_timeout is not None else step_timeout)
        self.num_failures = 0
        self.worker_restarts = 0
        self._factory = engine_factory
        self._ctx = mp.get_context(start_method)
        self._num_slots: int | None = None
        self._dead: dict[int, str] = {}  # slot -> why it is dead (until the next reset)
        self._engines: dict = {}  # in-process mode only
        self._workers: list[_Worker] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        _LIVE.add(self)
        try:
            self._workers.extend(self._spawn(idx) for idx in range(num_workers))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            self.close()
            raise ValueError("engine_factory must be picklable for num_workers > 0: use a module-level "
                             f"callable or functools.partial of one ({type(exc).__name__}: {exc})") from exc

    def reset(self, sources: Sequence[str]) -> list[SlotResult]:
        """(Re)assign slot i to worker i % num_workers, load sources[i] into it; results in slot order."""
        self._check_open()
        sources = list(sources)
        if not all(isinstance(src, str) for src in sources):
            raise ValueError("reset() takes a sequence of source strings (e.g. game file paths)")
        for idx, w in enumerate(self._workers):  # a worker that died between calls is replaced silently
            if not w.proc.is_alive():
                self._replace(idx)
        self._num_slots, self._dead = len(sources), {}
        batches: dict[int, list] = {w: [] for w in range(max(1, self.num_workers))}
        for slot, source in enumerate(sources):
            batches[self._worker_of(slot)].append((slot, source))
        results = self._dispatch("reset", batches, self.reset_timeout)
        return [results[slot] for slot in range(len(sources))]

    def step(self, commands: Mapping[int, str]) -> dict[int, SlotResult]:
        """Step only the given slots, all workers in parallel; returns {slot: result} in slot order."""
        self._check_open()
        if self._num_slots is None:
            raise ValueError("call reset(sources) before step(): no slots exist yet")
        for slot, command in commands.items():
            if not isinstance(slot, int) or not 0 <= slot < self._num_slots:
                raise ValueError(f"unknown slot {slot!r}: the last reset() created slots 0..{self._num_slots - 1}")
            if not isinstance(command, str):
                raise ValueError(f"command for slot {slot} must be a str, got {type(command).__name__}")
        results: dict[int, SlotResult] = {}
        batches: dict[int, list] = defaultdict(list)
        for slot in sorted(commands):
            if slot in self._dead:
                results[slot] = SlotResult(slot, None, True, f"slot {slot} is dead until reset(): {self._dead[slot]}")
            else:
                batches[self._worker_of(slot)].append((slot, commands[slot]))
        results.update(self._dispatch("step", batches, self.step_timeout))
        return {slot: results[slot] for slot in sorted(results)}

    @property
    def live_slots(self) -> list[int]:
        return [s for s in range(self._num_slots or 0) if s not in self._dead]

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (empty in in-process mode), for monitoring."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Stop all workers (killing any that do not exit within a second). Idempotent."""
        self._closed = True
        self._finalizer()
        _drop_engines(self._engines)

    def __enter__(self) -> EnvWorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EnvWorkerPool is closed; create a new pool")

    def _worker_of(self, slot: int) -> int:
        return slot % self.num_workers if self.num_workers else 0

    def _spawn(self, idx: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self._factory), daemon=True,
                                 name=f"EnvWorker-{idx}")
        try:
            proc.start()
        finally:
            child_conn.close()  # the parent keeps only its end, so a dead child reads as EOF
        return _Worker(proc, parent_conn)

    def _replace(self, idx: int) -> None:
        old = self._workers[idx]
        if old.proc.is_alive():
            old.proc.kill()
        old.proc.join(1.0)
        old.conn.close()
        self._workers[idx] = self._spawn(idx)
        self.worker_restarts += 1

    def _fail(self, slot: int, error: str) -> None:
        if slot not in self._dead:
            self._dead[slot] = error
            self.num_failures += 1

    def _lose_worker(self, idx: int, reason: str) -> None:
        """Kill and replace worker `idx`; every slot it hosted is dead until the next reset."""
        self._replace(idx)
        for slot in range(idx, self._num_slots or 0, self.num_workers):
            self._fail(slot, f"{reason}; its replacement does not have slot {slot}'s engine")

    def _dispatch(self, op: str, batches: Mapping[int, list], timeout: float) -> dict[int, SlotResult]:
        if self.num_workers:
            raw, broken = self._exchange(op, batches, timeout)
        else:
            raw, broken = _run_batch(self._engines, self._factory, op, [i for b in batches.values() for i in b]), {}
        results = {}
        for slot, payload, error, seconds in raw:
            if error is not None:
                self._fail(slot, error)
            results[slot] = SlotResult(slot, payload, error is not None, error or "", seconds)
        for idx, why in sorted(broken.items()):
            if why == "timeout":
                reason, each = f"worker {idx} timed out", f"{op} timed out after {timeout} s (worker {idx}, slot {{}})"
            else:
                self._workers[idx].proc.join(1.0)  # EOF can come just before the exit code is set
                reason = f"worker {idx} crashed (exit code {self._workers[idx].proc.exitcode})"
                each = f"{reason} while {_VERB[op]} slot {{}}"
            for slot, _ in batches[idx]:
                self._fail(slot, each.format(slot))
                results[slot] = SlotResult(slot, None, True, each.format(slot), 0.0)
            self._lose_worker(idx, reason)
        return results

    def _exchange(self, op: str, batches: Mapping[int, list], timeout: float) -> tuple[list, dict[int, str]]:
        """Send each worker its batch, gather replies until the deadline; returns (raw results, broken)."""
        raw: list = []
        broken: dict[int, str] = {}  # worker index -> "crashed" | "timeout"
        pending = {}
        try:
            for idx, items in batches.items():
                try:
                    self._workers[idx].conn.send((op, items, draw_worker_fault(op)))
                    pending[self._workers[idx].conn] = idx
                except OSError:  # its end of the pipe is gone: the process died
                    broken[idx] = "crashed"
            deadline = time.monotonic() + timeout
            while pending:
                ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    broken.update({idx: "timeout" for idx in pending.values()})
                    break
                for conn in ready:
                    idx = pending.pop(conn)
                    try:
                        raw.extend(conn.recv())
                    except (EOFError, OSError):
                        broken[idx] = "crashed"
        except BaseException:  # e.g. Ctrl-C: a reply left in flight would desynchronise that pipe
            for idx in pending.values():
                self._lose_worker(idx, f"worker {idx} was interrupted while {_VERB[op]}")
            raise
        return raw, broken
