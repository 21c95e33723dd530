"""Crash-safe checkpoints and resume.

- **Atomic writes** (`AtomicCheckpointIO`): a checkpoint is written to a temporary file in the same folder,
  flushed to disk, then renamed over its name (`os.replace`), so a kill at any moment leaves either the old
  `last.ckpt` or the new one, never a torn file. Leftover temporaries (`.<name>.tmp-<pid>`) are ignored.
- **Safe reads**: checkpoints are loaded with `torch.load(weights_only=True)` (tensors and plain containers
  only, no pickled code). A truncated or foreign file is a one-line `CheckpointError`.
- **Resume** (`resume=auto | <run dir>`): `last_good_checkpoint` is the checkpoint of the run folder with the
  most training steps that reads back whole; `conf/hydra/default.yaml` puts the resumed process in the same
  run folder (`run_dir`), and `trim_metrics` drops the CSV rows the killed process logged after that
  checkpoint, so every training step appears once in `metrics.csv`.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import os

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from stepopsd.errors import UserError

LEGACY_STATE_KEY = "TeacherRescoring"  # the callback that held StepOPSD's state before the estimator registry

LAST = "last.ckpt"


class CheckpointError(UserError):
    """A checkpoint that cannot be used: truncated, not a checkpoint, or written for another model or config."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes (temporary file + fsync + rename) and
    weights-only reads."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        return read_checkpoint(str(path), map_location=map_location)


def atomic_save(obj, path: str) -> None:
    """torch.save `obj` to `path` so that a kill at any point leaves the previous file (or none) intact."""
    from stepopsd.faults import maybe_kill

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if isinstance(obj, dict) and "epoch" in obj:  # tests only: SIGKILL here, the new file half written
                maybe_kill("save", steps_done(obj), f)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """A Lightning checkpoint file, read weights-only (`mmap`: tensors stay on disk until touched, for checks);
    a `CheckpointError` (one line) when it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file (runs write them to <run dir>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated (a torn copy), not a torch file, or pickled objects beyond tensors
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {why}): it may be truncated; "
                              f"resume from another one in {os.path.dirname(path)} or with resume=auto") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path} is a torch file but not a training checkpoint (no state_dict / epoch): "
                              "pass a <run dir>/checkpoints/*.ckpt file")
    return ckpt


def steps_done(ckpt: dict) -> int:
    """Training steps a checkpoint holds (one Lightning epoch per training step; saved at the epoch's end)."""
    return int(ckpt["epoch"]) + 1


def last_good_checkpoint(run_dir: str) -> tuple[str, int] | None:
    """(path, training steps) of the run folder's checkpoint with the most training steps that reads back
    whole, or None. A torn or unreadable file is skipped (a run killed before atomic writes, a bad disk)."""
    best = None
    for path in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt"))):
        try:
            steps = steps_done(read_checkpoint(path, mmap=True))
        except CheckpointError:
            continue
        if best is None or steps > best[1] or (steps == best[1] and os.path.basename(path) == LAST):
            best = (path, steps)
    return best


def remove_torn(run_dir: str) -> int:
    """Delete the temporary files of checkpoint writes a killed process left behind; returns how many."""
    torn = glob.glob(os.path.join(run_dir, "checkpoints", ".*.tmp-*"))
    for path in torn:
        with contextlib.suppress(FileNotFoundError):  # another rank of the launch was first
            os.remove(path)
    return len(torn)


def check_compatible(ckpt: dict, path: str, module: torch.nn.Module, estimator: str) -> None:
    """A checkpoint of another model or config is a one-line error before training starts (instead of
    load_state_dict's page of missing keys and size mismatches)."""
    saved, own = ckpt["state_dict"], module.state_dict()
    fix = "resume with the config the checkpoint's run used (its .hydra/config.yaml)"
    if missing := [k for k in own if k not in saved]:
        extra = [k for k in saved if k not in own]
        raise CheckpointError(f"{path} was written for another model: {len(missing)} weights missing (e.g. {missing[0]})"
                              + (f", {len(extra)} unexpected (e.g. {extra[0]})" if extra else "") + f"; {fix}")
    for k, v in own.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path} was written for another model: {k} has shape {tuple(saved[k].shape)} there, "
                                  f"{tuple(v.shape)} here; {fix}")
    was = checkpoint_estimator(ckpt.get("callbacks", {}))  # the advantage estimator of the checkpoint's run
    if was != estimator:
        raise CheckpointError(f"{path} is an algorithm={was} checkpoint and this run is algorithm={estimator}; {fix}")


def trim_metrics(run_dir: str, steps: int) -> int:
    """Drop the rows the CSV logger wrote after the checkpoint of `steps` training steps (a killed process
    logged them; the resumed one logs them again): training rows (`train_step`) past `steps` and validation
    rows past step `steps`. Returns the rows dropped. The file is rewritten atomically."""
    dropped = 0
    for path in glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv")):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        keep = [r for r in rows if _row_steps(r) <= steps]
        dropped += len(rows) - len(keep)
        if len(keep) != len(rows):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(keep)
            os.replace(tmp, path)
    return dropped


def _row_steps(row: dict) -> float:
    """The training steps done when a CSV row was logged: `train_step` on training rows; a validation row is
    logged at `step` = the training steps done before it."""
    return float(row["train_step"]) if row.get("train_step") else float(row.get("step") or 0)



class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing metrics.csv (rows appended, its header kept) instead of
    deleting it: a resumed run writing into its own folder again."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger (conf/logger/csv.yaml); with `resume=True` it continues the folder's latest
    `version_*/metrics.csv` instead of starting version_N+1, so a resumed run keeps one metrics file."""

    def __init__(self, save_dir: str, name: str = "csv", resume=None, **kwargs):
        versions = sorted(int(p.rsplit("version_", 1)[1]) for p in glob.glob(os.path.join(save_dir, name, "version_*")))
        self.resume = bool(resume) and bool(versions)
        super().__init__(save_dir, name=name, version=versions[-1] if self.resume else None, **kwargs)

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = (_ContinuedWriter if self.resume else ExperimentWriter)(log_dir=self.log_dir)
        return self._experiment


def checkpoint_estimator(callback_states: dict) -> str:
    """The estimator a checkpoint's run used, from its callback states: the advantage stage's record (under
    "AdvantageStage", or StepOPSD's under the former TeacherRescoring key), else `stepopsd` for a TeacherRescoring
    state from before the registry, else `grpo` (a run from before the registry without one)."""
    for key, state in callback_states.items():
        if key in ("AdvantageStage", LEGACY_STATE_KEY) and isinstance(state, dict) and "estimator" in state:
            return state["estimator"]
    return "stepopsd" if any(str(k).startswith(LEGACY_STATE_KEY) for k in callback_states) else "grpo"
