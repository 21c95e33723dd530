"""Read a run's results back (for notebooks and tables): the CSV logger's metrics as series.

`read_metrics(run_dir)` returns {metric name: [(step, value), ...]} from
`<run dir>/csv/version_*/metrics.csv` (the latest version), skipping the empty cells the CSV
logger writes for metrics not logged on a row. `validation(run_dir)` picks the validation series
(`val/<split>/...` on official data, `val_generated/<split>/...` on generated data: the label stays in the name).
"""
from __future__ import annotations

import csv
import glob
import os


def metrics_file(run_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv")),
                   key=lambda p: int(p.split("version_")[-1].split(os.sep)[0]))
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}: pass a run directory (outputs/<task>/runs/<time>)")
    return files[-1]


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_file(run_dir)) as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((step, float(value)))
    return series


def validation(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    return {k: v for k, v in read_metrics(run_dir).items() if k.startswith(("val/", "val_"))}
