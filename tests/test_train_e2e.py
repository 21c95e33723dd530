"""The real entry point on a tiny configuration: `python train.py experiment=alfworld_heat machine=cpu ...`."""
import csv
import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import run_train, tiny_overrides, train_rows


@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


@pytest.mark.parametrize("algorithm", ["grpo", "stepopsd"])
def test_train_runs_end_to_end_and_updates_the_policy(algorithm, games, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # shared: the SFT warm start is built once
    out = tmp_path_factory.mktemp(f"run-{algorithm}")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", f"algorithm={algorithm}", *tiny_overrides(games, cache, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[generated data]" in proc.stdout
    (metrics_file,) = glob.glob(str(out / "csv" / "version_0" / "metrics.csv"))
    rows = list(csv.DictReader(open(metrics_file)))
    train_rows = [r for r in rows if r.get("actor/pg_loss")]
    assert len(train_rows) == 2
    assert all(float(r["rollout/logp_gap_mean"]) < 1e-3 for r in train_rows)
    assert any(r.get("val_generated/valid_seen/success") for r in rows)
    assert ("stepopsd/lambda" in rows[0]) == (algorithm == "stepopsd")
    (sft_folder,) = glob.glob(str(cache / "tiny-*"))
    before = load_file(os.path.join(sft_folder, "model.safetensors"))
    after = load_file(str(out / "policy" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the policy"


def test_validation_on_two_splits_is_reported_per_split(games, tmp_path_factory):
    """data.val_splits=[valid_seen,valid_unseen] (the paper configs' default): both validated at the start
    and the end, metrics named per split, the first split's success is what the run reports."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    out = tmp_path_factory.mktemp("two-splits")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", "algorithm=grpo", *tiny_overrides(games, cache, out),
                     "training_steps=1", "val_every=0", "data.val_splits=[valid_seen,valid_unseen]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 valid_seen, 1 valid_unseen validation tasks" in proc.stdout
    rows, _ = train_rows(out)
    val = [r for r in rows if r.get("val_generated/valid_seen/success")]
    assert [r["step"] for r in val] == ["0", "1"]  # start and end (CSV rows of logger.log_metrics)
    for split in ("valid_seen", "valid_unseen"):
        assert all(r[f"val_generated/{split}/success"] != "" and r[f"val_generated/{split}/success_heat"] != "" for r in val)
        assert f"validation success on {split} by step: [(0, " in proc.stdout
    assert "val_generated/success" not in rows[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")
@pytest.mark.parametrize("algorithm", ["grpo", "stepopsd"])
def test_train_on_the_gpu(algorithm, games, tmp_path_factory):
    """The same tiny run with trainer.accelerator=gpu: rollouts, rescoring and updates on the GPU."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    out = tmp_path_factory.mktemp(f"gpu-{algorithm}")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", f"algorithm={algorithm}", "trainer.accelerator=gpu",
                     *tiny_overrides(games, cache, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, steps = train_rows(out)
    assert len(steps) == 2 and all(float(r["rollout/logp_gap_mean"]) < 1e-3 for r in steps)
    assert ("stepopsd/lambda" in rows[0]) == (algorithm == "stepopsd")


def test_bad_config_fails_fast_with_one_line(games, tmp_path):
    proc = run_train("experiment=alfworld_heat", "machine=cpu", "group_size=1", *tiny_overrides(games, tmp_path, tmp_path)[:1])
    assert proc.returncode == 2 and "group_size=1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_train("experiment=alfworld_heat", "machine=cpu", "algorithm.stepopsd.alpha_clip=1.5")
    assert proc.returncode == 2 and "alpha_clip" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU hint")
def test_without_gpu_and_without_machine_cpu_the_hint_says_to_add_it():
    proc = run_train("experiment=alfworld_heat")
    assert proc.returncode == 2 and "machine=cpu" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_from_a_checkpoint_continues_the_run_exactly(games, tmp_path_factory):
    """Two steps straight vs one step, stop, resume from its checkpoint: same final weights, same
    lambda schedule step and teacher clock, next tasks of the same order (all from the checkpoint)."""
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    base = [*tiny_overrides(games, cache, "X"), "callbacks.checkpoint_every=1", "callbacks.keep_checkpoints=-1",
            "algorithm.stepopsd.teacher_refresh=1", "val_every=0"]
    straight, first, resumed = (tmp_path_factory.mktemp(n) for n in ("straight", "first", "resumed"))
    over = lambda out: [o if not o.startswith("hydra.run.dir") else f"hydra.run.dir={out}" for o in base]
    for out, extra in ((straight, []), (first, ["training_steps=1"])):
        proc = run_train("experiment=alfworld_heat", "machine=cpu", *over(out), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(straight / "checkpoints")) == ["last.ckpt", "step0001.ckpt", "step0002.ckpt"]
    proc = run_train("experiment=alfworld_heat", "machine=cpu", *over(resumed),
                     f"ckpt_path={first / 'checkpoints' / 'step0001.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, straight_rows = train_rows(straight)
    _, resumed_rows = train_rows(resumed)
    assert len(resumed_rows) == 1  # only the second step ran
    for key in ("stepopsd/lambda", "stepopsd/teacher_age", "reward/mean", "actor/pg_loss"):
        assert resumed_rows[0][key] == straight_rows[1][key], key
    a = load_file(str(straight / "policy" / "model.safetensors"))
    b = load_file(str(resumed / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different weights"


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    proc = run_train("experiment=alfworld_heat", "machine=cpu", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert proc.returncode == 2 and "nope.ckpt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_two_process_ddp_keeps_groups_whole_reduces_metrics_and_weights_identical(games, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    out = tmp_path_factory.mktemp("ddp")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", "algorithm=stepopsd", *tiny_overrides(games, cache, out),
                     "trainer.strategy=ddp", "trainer.devices=2", "env.num_workers=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[ddp] weight fingerprints across 2 ranks differ by at most 0" in proc.stdout
    rows, steps = train_rows(out)
    assert len(steps) == 2
    # each rank rolls out its own whole group (tasks_per_step=1, group_size=2): summed over ranks, 4 episodes
    assert all(float(r["rollout/episodes"]) == 4.0 for r in steps)
    assert any(r.get("val_generated/valid_seen/success") for r in rows)
