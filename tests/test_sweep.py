"""The Optuna sweeper end to end: `python train.py -m hparams_search=... experiment=alfworld_heat machine=cpu` on the
tiny configuration (hydra_plugins/stepopsd_optuna, stepopsd/sweep.py): objective values, seeds, best params,
resume after a killed sweep, pruning, failing trials, and one-line errors for bad sweep configs."""
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import sweep_command
from optuna.trial import TrialState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID = "val_generated/valid_seen/success"


def run(cmd, timeout=900):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def trials(out, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db").get_trials()


def metric_rows(job_dir):
    (path,) = glob.glob(os.path.join(job_dir, "csv", "version_*", "metrics.csv"))
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny-cache"


def test_a_grid_sweep_with_two_seeds_records_objectives_and_the_best_params(tiny_study):
    ts = optuna.load_study(study_name=tiny_study["study_name"], storage=tiny_study["storage"]).get_trials()
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["algorithm.stepopsd.alpha_clip"] for t in ts) == [0.05, 0.2]  # the grid, each point once
    assert all(t.params["algorithm.stepopsd.lam0"] == 0.1 for t in ts)
    for t in ts:
        assert t.user_attrs["seeds"] == [0, 1]
        # each seed's value is the last validation its own job logged; the objective is their mean
        last = []
        for job_dir in t.user_attrs["job_dirs"]:
            assert os.path.basename(job_dir).startswith(f"trial{t.number}-seed")
            rows = metric_rows(job_dir)
            last.append([float(r[VALID]) for r in rows if r.get(VALID)][-1])
            overrides = yaml.safe_load(open(os.path.join(job_dir, ".hydra", "overrides.yaml")))
            assert f"algorithm.stepopsd.alpha_clip={t.params['algorithm.stepopsd.alpha_clip']}" in overrides
        assert t.user_attrs["seed_values"] == last
        assert t.value == pytest.approx(sum(last) / len(last))
        assert sorted(t.intermediate_values) == [1, 2]  # the first seed's validations after steps 1 and 2
    (results,) = glob.glob(os.path.join(tiny_study["multirun_dir"], "optimization_results.yaml"))
    results = yaml.safe_load(open(results))
    best = max(ts, key=lambda t: t.value)  # ties: Optuna keeps the first
    assert results["best_params"] == best.params and results["best_value"] == best.value
    assert results["complete"] == 2 and results["fail"] == 0 and results["pruned"] == 0


def test_a_killed_sweep_resumes_without_losing_or_repeating_a_trial(games, cache, tmp_path):
    cmd = sweep_command(games, cache, tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=null",
                        "hydra.sweeper.study_name=killed", search="two_knob")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # kill it while its second trial runs: asked, its parameters drawn
            try:  # (a trial is RUNNING from inside `ask`, before its parameters are written one by one)
                ts = trials(tmp_path, "killed")
            except KeyError:  # the study is not created yet
                ts = []
            states = [t.state for t in ts]
            if states == [TrialState.COMPLETE, TrialState.RUNNING] and len(ts[1].params) == 2:
                break
            assert proc.poll() is None, f"the sweep ended before it could be killed: {states}"
            time.sleep(0.2)
        else:
            pytest.fail("the second trial never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    second = trials(tmp_path, "killed")[1].params
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 2 trials done, 1 to run" in again.stdout
    ts = trials(tmp_path, "killed")
    assert [t.state for t in ts] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert ts[1].user_attrs["interrupted"] and ts[2].user_attrs["retry_of"] == 1
    assert ts[2].params == second  # the interrupted trial is asked again, and nothing else runs


def test_a_pruned_trial_stops_training_early_and_is_recorded_pruned(games, cache, tmp_path):
    # every tiny validation is 0 (3 env steps cannot solve a heat game): a threshold of 0.5 prunes at step 1
    proc = run(sweep_command(games, cache, tmp_path, "training_steps=3", "algorithm.stepopsd.alpha_clip=choice(0.1)",
                             "algorithm.stepopsd.lam0=choice(0.1)", "hydra.sweeper.seeds_per_trial=1",
                             "hydra.sweeper.study_name=pruned",
                             "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.5}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (t,) = trials(tmp_path, "pruned")
    assert t.state == TrialState.PRUNED and t.intermediate_values == {1: 0.0}
    steps = [r for r in metric_rows(t.user_attrs["job_dirs"][0]) if r.get("actor/pg_loss")]
    assert len(steps) == 1, "training went on after the pruner stopped it"


def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(games, cache, tmp_path):
    # lr 1e30 blows the weights up: the next update's loss is non-finite, skipped, and with
    # max_nonfinite_updates=1 the run stops (NonFiniteError: a run failure, not a bad config)
    proc = run(sweep_command(games, cache, tmp_path, "algorithm.stepopsd.alpha_clip=0.1", "algorithm.stepopsd.lam0=0.1",
                             "algorithm.ppo.lr=choice(1e30,5e-4)", "hydra.sweeper.seeds_per_trial=1",
                             "algorithm.ppo.max_nonfinite_updates=1",
                             "hydra.sweeper.max_failure_rate=0.5", "hydra.sweeper.study_name=crash"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ts = {t.params["algorithm.ppo.lr"]: t for t in trials(tmp_path, "crash")}
    assert ts[1e30].state == TrialState.FAIL and "NonFiniteError" in ts[1e30].user_attrs["error"]
    assert os.path.isfile(os.path.join(ts[1e30].user_attrs["job_dirs"][0], "error.txt"))
    assert ts[5e-4].state == TrialState.COMPLETE
    # past max_failure_rate the sweep stops with one line
    proc = run(sweep_command(games, cache, tmp_path, "algorithm.stepopsd.alpha_clip=0.1", "algorithm.stepopsd.lam0=0.1",
                             "algorithm.ppo.lr=choice(1e30)", "hydra.sweeper.seeds_per_trial=1",
                             "algorithm.ppo.max_nonfinite_updates=1",
                             "hydra.sweeper.max_failure_rate=0", "hydra.sweeper.study_name=crash-limit"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("train.py -m: error: 1 of the study's 1")
    assert "Traceback" not in proc.stderr


def test_n_jobs_trials_run_in_parallel_through_the_submitit_launcher(games, cache, tmp_path):
    """n_jobs trials asked together and launched as one batch; submitit_local runs each job in its own process
    (Hydra's joblib launcher cannot: its loky workers cannot spawn the env worker processes)."""
    proc = run(sweep_command(games, cache, tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                             "hydra.sweeper.pruner=null", "hydra.sweeper.study_name=parallel", "training_steps=1",
                             "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", search="two_knob"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 at a time" in proc.stdout
    ts = trials(tmp_path, "parallel")
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 2 and ts[0].params != ts[1].params
    assert proc.stdout.count("Submitit 'local' sweep output dir") == 1  # both trials in one batch, run side by side


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.stepopsd.alpa_clip=choice(0.1,0.2)"], "no config key 'algorithm.stepopsd.alpa_clip'"),
    (["algorithm=grpo"], "no config key 'algorithm.stepopsd.alpha_clip'"),
    (["hydra.sweeper.n_trials=0"], "n_trials=0"),
    (["hydra.sweeper.n_trials=10"], "<= the grid's 9 points"),
    (["hydra.sweeper.direction=up"], "direction='up'"),
    (["algorithm.stepopsd.lam0=interval(0.1,0.2)"], "GridSampler"),
    (["hydra.sweeper.seeds_per_trial=0"], "seeds_per_trial=0"),
    (["hydra.sweeper.storage=nowhere"], "hydra.sweeper.storage=nowhere"),
    (["hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler", "hydra.sweeper.n_trials=2"], "hydra.sweeper.sampler"),
    (["optimized_metric=valid_seen/succes"], "trial 0 (seed 0): optimized_metric"),
    (["optimized_metric=val/valid_seen/success"], "logs val_generated/..."),
    (["trainer=ddp", "trainer.devices=2"], "a Hydra sweep (-m) runs each trial in one process"),
])
def test_bad_sweep_configs_are_one_line_errors(overrides, message, games, cache, tmp_path):
    proc = run(sweep_command(games, cache, tmp_path, *overrides), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py -m: error:") and message in last, last


def test_interval_bounds_and_log_scale_are_checked_before_any_trial(games, cache, tmp_path):
    proc = run(sweep_command(games, cache, tmp_path, "algorithm.stepopsd.lam0=interval(0.2,0.1)", search="two_knob"))
    assert proc.returncode == 2 and "needs start < end" in proc.stderr.strip().splitlines()[-1]
    proc = run(sweep_command(games, cache, tmp_path, "algorithm.stepopsd.lam0=tag(log,interval(0,0.1))", search="two_knob"))
    assert proc.returncode == 2 and "> 0 on a log scale" in proc.stderr
    assert not (tmp_path / "multirun").exists()  # nothing launched


@pytest.mark.parametrize("url", ["sqlite:///{}/s.db", "journal:///{}/s.log"])
def test_storage_urls_hold_a_study_across_processes(url, tmp_path):
    from stepopsd.sweep import open_storage

    url = url.format(tmp_path / "deep" / "er")
    study = optuna.create_study(study_name="x", storage=open_storage(url), direction="maximize")
    study.tell(study.ask({"a": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    again = optuna.load_study(study_name="x", storage=open_storage(url))
    assert [t.value for t in again.trials] == [0.5]
    with pytest.raises(ValueError, match="sqlite:///"):
        open_storage("study.db")


def test_a_resumed_sweep_does_not_draw_the_same_parameters_again(tmp_path):
    """The sampler is seeded (reproducible), so a resumed sweep offsets its seed by the trials already in the study:
    otherwise TPE's random start-up would hand the next trial the first trial's parameters again."""
    from omegaconf import OmegaConf

    from hydra_plugins.stepopsd_optuna.optuna_sweeper import OptunaSweeper

    space = {"a": optuna.distributions.FloatDistribution(0.0, 1.0)}
    sweeper = OptunaSweeper(sampler=OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 0}),
                            storage=f"sqlite:///{tmp_path}/s.db", study_name="resume")
    first = sweeper._study(space).ask(space)
    sweeper._study(space).tell(first.number, 0.5)
    again = sweeper._study(space).ask(space)  # as a second run of the same command would
    assert again.params != first.params
    fresh = OptunaSweeper(sampler=OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 0}),
                          storage=f"sqlite:///{tmp_path}/t.db", study_name="resume")
    assert fresh._study(space).ask(space).params == first.params  # same seed, same first draw: reproducible


def test_pruner_null_never_prunes(tmp_path):
    """`pruner: null` (the grid) must mean no pruning: Optuna's own default for a study without a pruner is a
    MedianPruner, which pruned a grid cell of the two-knob study whose first seed ended below the median."""
    from hydra_plugins.stepopsd_optuna.optuna_sweeper import OptunaSweeper

    space = {"a": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study = OptunaSweeper(storage=f"sqlite:///{tmp_path}/p.db", study_name="nop")._study(space)
    for value in (0.9, 0.8, 0.7, 0.6, 0.5, 0.1):  # finished trials that report step 20, then a low one
        trial = study.ask(space)
        trial.report(value, 20)
        assert not trial.should_prune()
        study.tell(trial.number, value)


def test_the_objective_is_the_mean_of_the_named_metrics_last_k_validations():
    from stepopsd.sweep import check_metric, metric_name, objective

    records = [(0, {"val_generated/valid_seen/success": 0.25}), (10, {"val_generated/valid_seen/success": 0.5,
                                                                       "val_generated/valid_seen/success_heat": 1.0}),
               (20, {"val_generated/valid_seen/success": 0.75})]
    name = metric_name(None, "val_generated", ["valid_seen"], "success")
    assert name == "val_generated/valid_seen/success"
    assert objective(records, name, 1) == 0.75
    assert objective(records, name, 2) == pytest.approx((0.5 + 0.75) / 2)
    assert objective(records, name, 9) == pytest.approx(0.5)  # fewer validations than K: all of them
    assert objective(records, "val_generated/valid_seen/success_heat", 3) == 1.0  # logged once
    assert metric_name("valid_seen/success_heat", "val", ["valid_seen"], "success") == "val/valid_seen/success_heat"
    assert check_metric("val/valid_unseen/success", "val", ["valid_seen", "valid_unseen"], "success", ["heat"]) is None
    assert "logs val/..." in check_metric("val_generated/valid_seen/success", "val", ["valid_seen"], "success", ["heat"])
