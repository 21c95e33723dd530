"""experiments/benchmarks/estimator_cost.py without training: bad flags are refused in one line, the interleaved run
order, and the table (ratios to the same repeat's GRPO) from a given raw JSON."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments", "benchmarks"))
import estimator_cost  # noqa: E402

ARMS = {"grpo": ["algorithm=grpo"], "rlsd": ["algorithm=rlsd"],
        "stepopsd+gigpo": ["algorithm=stepopsd", "algorithm.base=gigpo"]}


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--steps", "two"], ["--repeats", "0"], ["--algorithms", "ppo"],
                                  ["--bogus"], ["--out", ROOT], ["--from-json", "/nonexistent.json"], ["extra"]])
def test_bad_flags_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        estimator_cost.parse_args(argv, arms=ARMS)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("estimator_cost.py: error:")


def test_flags_and_order():
    a = estimator_cost.parse_args(["--algorithms", "rlsd", "--steps", "3"], arms=ARMS)
    assert list(a.arms) == ["grpo", "rlsd"] and a.steps == 3  # the baseline is always run
    names = list(ARMS)
    orders = [estimator_cost.run_order(names, r) for r in range(4)]
    assert orders[0] == names and orders[1] == names[::-1] and orders[2] == names[1:] + names[:1]
    assert all(sorted(o) == sorted(names) for o in orders)


def run(arm, repeat, step_s, rss_gib, update, rescore=None):
    phases = {"time/rollout_s": [5.0], "time/update_s": [update]} | ({"time/rescore_s": [rescore]} if rescore else {})
    return {"arm": arm, "repeat": repeat, "rc": 0, "step_s": step_s, "step_cpu_s": [s / 2 for s in step_s], "phases": phases,
            "peak_rss_bytes": int(rss_gib * 2**30)}


def test_table_from_raw_json(tmp_path, capsys):
    raw = {"runs": [run("grpo", 0, [10.0, 12.0], 1.0, 4.0), run("rlsd", 0, [13.2], 1.1, 4.0, 2.0),
                    run("rlsd", 1, [15.0], 1.0, 6.0, 2.0), run("grpo", 1, [10.0], 1.0, 4.0),
                    {"arm": "sdar", "repeat": 0, "rc": 1, "step_s": [], "phases": {}, "peak_rss_bytes": 0}]}
    rows = {r["arm"]: r for r in estimator_cost.summarize(raw)}
    assert rows["grpo"]["step_ratio"] == (1.0, 1.0, 1.0) and rows["grpo"]["step_s"] == 10.0
    # repeat 0: 13.2 / median(10, 12) = 1.2; repeat 1: 15 / 10 = 1.5
    assert rows["rlsd"]["step_ratio"] == pytest.approx((1.35, 1.2, 1.5))
    assert rows["rlsd"]["cpu_ratio"] == pytest.approx((1.35, 1.2, 1.5)) and rows["rlsd"]["step_cpu_s"] == pytest.approx(7.05)
    assert rows["rlsd"]["update_ratio"] == pytest.approx((1.25, 1.0, 1.5))
    assert rows["rlsd"]["rss_ratio"] == pytest.approx((1.05, 1.0, 1.1), rel=1e-6)
    assert rows["sdar"]["runs"] == 0 and rows["sdar"]["step_ratio"] is None
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    estimator_cost.main(["--from-json", str(path)])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("| rlsd |"))
    assert line.count("| 1.35 (1.20-1.50) |") == 2 and "| 2.00 |" in line  # the teacher's advantage phase
    assert next(x for x in out.splitlines() if x.startswith("| grpo |")).split(" | ")[3] == "1.00"
    assert "Failed runs (not in the table): sdar (repeat 0, rc 1)" in out
