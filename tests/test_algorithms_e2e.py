"""Every `algorithm=` value of conf/algorithm/ that has no end-to-end test of its own runs 2 training steps of the CPU
ALFWorld job through `train.py` (grpo and stepopsd: tests/test_train_e2e.py; gigpo: tests/test_gigpo.py; oracle, which
needs an environment that knows each step's exact credit: tests/test_credit_env.py)."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import ROOT, run_train, tiny_overrides, train_rows

OWN_TESTS = {"grpo", "stepopsd", "gigpo", "oracle"}  # oracle: the credit env's (tests/test_credit_env.py)
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


SEARCH_KINDS = ["grpo", "gigpo", "rlsd", "opsd"]  # one per code path: outcome, step-level, token reweighting, loss term


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    from stepopsd.envs.search.generate import make_qa

    out = tmp_path_factory.mktemp("qa")
    make_qa(str(out), 0, num_entities=120, train_questions=40, test_questions=8)
    return out


@pytest.mark.parametrize("algorithm", SEARCH_KINDS)
def test_each_kind_of_estimator_trains_two_steps_on_search_qa(algorithm, qa, tmp_path_factory):
    """`experiment=searchqa machine=cpu` (generated corpus and questions, the run's own BM25 server): the estimator
    runs on Search-QA's step rows (its target span: the step without the inserted <information>)."""
    cache = tmp_path_factory.getbasetemp() / "search-tiny-cache"  # shared by these runs: SFT built once
    out = tmp_path_factory.mktemp(f"search-{algorithm}")
    proc = run_train("experiment=searchqa", "machine=cpu", f"algorithm={algorithm}", f"data.path={qa}",
                     "data.generate=null", f"paths.cache_dir={cache}", f"hydra.run.dir={out}", "training_steps=2",
                     "tasks_per_step=2", "group_size=2", "val_tasks=2", "val_every=2", "val_samples=1",
                     "rollout.max_new_tokens=32", "model.sft.epochs=1", "model.vocab_size=1024",
                     "model.architecture.hidden_size=32", "model.architecture.num_layers=1",
                     "model.architecture.intermediate_size=64", "algorithm.ppo.entropy_coef=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, steps = train_rows(out)
    assert len(steps) == 2 and all(float(r["rollout/logp_gap_mean"]) < 1e-3 for r in steps)
    signature = {"gigpo": "gigpo/anchor_group_frac"} | SIGNATURE
    if algorithm in signature:
        assert any(r.get(signature[algorithm]) for r in rows), sorted(rows[-1])
