"""Every `algorithm=` value of conf/algorithm/ that has no end-to-end test of its own runs 2 training steps of the CPU
ALFWorld job through `train.py` (grpo and stepopsd: tests/test_train_e2e.py; gigpo: tests/test_gigpo.py)."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import ROOT, run_train, tiny_overrides, train_rows

OWN_TESTS = {"grpo", "stepopsd", "gigpo"}
ALGORITHMS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "algorithm")) if f[:-5] not in OWN_TESTS)
SIGNATURE = {"rlsd": "rlsd/lambda", "sdar": "actor/distill_loss", "opsd": "actor/distill_loss",
             "grpo_opsd": "actor/distill_loss"}  # a metric only that estimator logs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_trains_two_steps_through_train_py(algorithm, generated_games, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # shared with the other e2e tests: SFT built once
    out = tmp_path_factory.mktemp(f"run-{algorithm}")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", f"algorithm={algorithm}",
                     *tiny_overrides(str(generated_games[0]), cache, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, steps = train_rows(out)
    assert len(steps) == 2 and all(float(r["rollout/logp_gap_mean"]) < 1e-3 for r in steps)
    if algorithm in SIGNATURE:
        assert any(r.get(SIGNATURE[algorithm]) for r in rows), sorted(rows[-1])
    (sft_folder,) = glob.glob(str(cache / "tiny-*"))
    before = load_file(os.path.join(sft_folder, "model.safetensors"))
    after = load_file(str(out / "policy" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the policy"
