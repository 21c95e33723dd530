"""The real entry point on the tiny configuration: `python train.py ...` in a subprocess, and its metrics CSV."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def tiny_overrides(games, cache, out):
    return [f"data.path={games}", "data.generate=null", f"paths.cache_dir={cache}", f"hydra.run.dir={out}",
            "training_steps=2", "tasks_per_step=1", "group_size=2", "env.max_steps=3", "val_tasks=1", "val_every=1",
            "rollout.max_new_tokens=24", "model.sft.epochs=1", "model.vocab_size=512",
            "model.architecture.hidden_size=32", "model.architecture.num_layers=1", "model.architecture.intermediate_size=64",
            "algorithm.ppo.logp_gap_threshold=0.001",
            "algorithm.ppo.entropy_coef=0.01"]  # a gradient even when every group is uniform (tiny runs rarely win)


def run_train(*overrides, env: dict | None = None):
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=None if env is None else os.environ | env)


def train_rows(out):
    """All rows of the run's metrics.csv, and those of training steps (with actor/pg_loss)."""
    rows = list(csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv")))
    return rows, [r for r in rows if r.get("actor/pg_loss")]
