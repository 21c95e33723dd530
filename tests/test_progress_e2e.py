"""The real `train.py` with its output going to pipes, as under `nohup python train.py ... > log`: plain progress
lines for the tiny policy's build, each training step and each validation, and every log line printed once."""
import re

from helpers.runs import run_train, tiny_overrides

LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[[A-Z]+\] - (.*)$")  # Hydra's job logging format


def test_batch_log_has_progress_lines_and_each_log_line_once(generated_games, tmp_path):
    out = tmp_path / "run"
    proc = run_train("experiment=alfworld_heat", "machine=cpu", *tiny_overrides(str(generated_games[0]), tmp_path / "cache", out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    def starting(prefix):
        return [ln for ln in lines if ln.startswith(prefix)]

    # the tiny policy is built (a fresh cache): demonstrations and SFT, each with its last line
    assert len(starting("[demos] episode 2/2 · 100 %")) == 1
    (sft_last,) = [ln for ln in starting("[sft] batch ") if " · 100 % · " in ln]
    assert "loss " in sft_last
    for step in (1, 2):  # training_steps=2: one line per step
        (train,) = starting(f"[train] step {step}/2 · ")
        assert " · success/rate " in train and " · reward/mean " in train and " · ETA " in train
    for step in (0, 1, 2):  # val_every=1: at the start, after step 1, at the end; a line at its start and its end
        start, end = starting(f"[validation] step {step} · ")
        assert start.endswith("valid_seen 1 tasks x 4 samples") and " · valid_seen success " in end

    messages = [m.group(1) for ln in lines if (m := LOG_LINE.match(ln))]
    assert "GPU available: False, used: False" in messages
    everything = proc.stdout + proc.stderr
    for message in messages:  # once: not also from Lightning's own handler ("INFO: ..." on stderr)
        assert everything.count(message) == 1, message
    job_log = (out / "train.log").read_text()
    assert all(message in job_log for message in messages)  # the job's log file keeps them all
