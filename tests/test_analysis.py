"""stepopsd.analysis on hand-made inputs with numbers computed by hand (the notebooks on real tiny runs: test_notebooks.py)."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from stepopsd import analysis as A  # noqa: E402

HEADER = "actor/pg_loss,epoch,step,stepopsd/step_sign_agreement,train_step,val_generated/valid_seen/success\n"


def write_run(run_dir, csv_text=None, algorithm="stepopsd", seed=0, overrides=(), budget_clip=2.0, version=0,
              val_splits=None):
    d = run_dir / "csv" / f"version_{version}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.csv").write_text(csv_text or HEADER + ",,0,,,0.25\n0.5,0,0,nan,1.0,\n,,1,,,0.5\n")
    (run_dir / ".hydra").mkdir(exist_ok=True)
    knobs = {"stepopsd": {"alpha_clip": 0.1, "lam0": 0.05, "budget_clip": budget_clip}} if algorithm == "stepopsd" else {}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "algorithm": {"name": algorithm, **knobs}, "data": {"task_types": ["heat", "cool"], **({"val_splits": val_splits} if val_splits else {})}}))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"algorithm={algorithm}", *overrides]))
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"experiment": "alfworld_heat", "env": "alfworld"}}}}))
    return str(run_dir)


def test_run_frame_drops_empty_cells_keeps_logged_nan_takes_the_latest_version_and_counts_training_steps(tmp_path):
    write_run(tmp_path, HEADER + ",,0,,,9\n", version=0)
    write_run(tmp_path, version=1)  # version_1 wins over version_0 (a resumed logger)
    long = A.run_frame(str(tmp_path))
    assert list(long.columns) == ["step", "metric", "value"]
    val = long[long.metric == "val_generated/valid_seen/success"]
    assert val[["step", "value"]].values.tolist() == [[0, 0.25], [1, 0.5]]  # validations: steps done
    # a training row's step is its train_step (1), not the logger's 0-based step column
    assert long[long.metric == "actor/pg_loss"][["step", "value"]].values.tolist() == [[1, 0.5]]
    nan = long[long.metric == "stepopsd/step_sign_agreement"]
    assert len(nan) == 1 and math.isnan(nan.value.iloc[0])  # logged nan stays; empty cells are gone
    wide = A.run_frame(str(tmp_path), wide=True)
    assert wide.loc[1, "val_generated/valid_seen/success"] == 0.5 and wide.loc[1, "actor/pg_loss"] == 0.5
    assert math.isnan(wide.loc[0, "actor/pg_loss"])


def test_a_folder_without_metrics_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass a run directory"):
        A.run_frame(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pass run directories or globs"):
        A.find_runs(str(tmp_path / "*"))


def test_find_runs_takes_globs_and_paths_and_lists_each_run_once(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "sweep" / "trial0-seed0")
    (tmp_path / "a-current").symlink_to(tmp_path / "a")  # as pytest's and some launchers' "latest" links
    (tmp_path / "empty").mkdir()
    assert A.find_runs(os.pathsep.join([str(tmp_path / "*"), str(tmp_path / "sweep" / "**"), a])) == [a, b]


def test_run_info_reads_the_knobs_and_the_arm_from_the_saved_config(tmp_path):
    off = A.run_info(write_run(tmp_path / "off", overrides=["algorithm.stepopsd.budget_clip=null", "seed=3"],
                               seed=3, budget_clip=None))
    assert off | {"run_dir": None} == {
        "run_dir": None, "experiment": "alfworld_heat", "algorithm": "stepopsd", "arm": "stepopsd budget_clip=null",
        "seed": 3, "alpha_clip": 0.1, "lam0": 0.05, "budget_clip": None, "task_types": "heat,cool",
        "val_splits": "", "data": "generated", "env": "alfworld", "trial": None}
    grpo = A.run_info(write_run(tmp_path / "grpo", HEADER.replace("val_generated/", "val/") + ",,0,,,0.25\n",
                                algorithm="grpo", overrides=["algorithm.stepopsd.lam0=0.5"]))
    assert (grpo["arm"], grpo["alpha_clip"], grpo["data"]) == ("grpo", None, "official")  # StepOPSD knobs ignored
    assert A.data_label(["actor/pg_loss"]) == "unknown"


def toy_runs(tmp_path):
    """3 seeds x 2 arms; final validation grpo 0.1, 0.2, 0.3 and stepopsd 0.2, 0.4, 0.6 (step 2)."""
    dirs = []
    for arm, finals in (("grpo", (0.1, 0.2, 0.3)), ("stepopsd", (0.2, 0.4, 0.6))):
        for seed, v in enumerate(finals):
            csv = HEADER + f",,0,,,0.0\n,,2,,,{v}\n"
            dirs.append(write_run(tmp_path / f"{arm}{seed}", csv, algorithm=arm, seed=seed))
    return A.runs_frame(A.find_runs(str(tmp_path / "*")))


def test_summarise_gives_mean_standard_error_and_n_over_seeds(tmp_path):
    runs = toy_runs(tmp_path)
    s = A.summarise(A.final(runs, "val_generated/valid_seen/success"), "arm").set_index("arm")
    # grpo: mean 0.2, sd 0.1, SE 0.1/sqrt(3) = 0.057735; stepopsd: mean 0.4, sd 0.2, SE 0.115470
    assert s.loc["grpo"].tolist() == pytest.approx([0.2, 0.057735, 3], abs=1e-6)
    assert s.loc["stepopsd"].tolist() == pytest.approx([0.4, 0.115470, 3], abs=1e-6)
    curve = A.summarise(runs, ["arm", "step"], "val_generated/valid_seen/success")
    assert curve[curve.step == 0][["mean", "se", "n"]].values.tolist() == [[0, 0, 3], [0, 0, 3]]
    with pytest.raises(ValueError, match="add 'step' to by"):
        A.summarise(runs, "arm", "val_generated/valid_seen/success")
    one = A.summarise(pd.DataFrame({"arm": ["a"], "value": [0.5]}), "arm")
    assert one["n"].item() == 1 and math.isnan(one["se"].item())


def test_paired_comparison_on_three_seeds_matches_the_hand_computed_t_test(tmp_path):
    finals = A.final(toy_runs(tmp_path), "val_generated/valid_seen/success")
    res = A.paired(finals, "grpo", "stepopsd")
    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, SE 0.1/sqrt(3), t = 0.2/SE = 3.464102; df = 2, where the t CDF is
    # 1/2 + t/(2 sqrt(t^2 + 2)), so p = 1 - t/sqrt(t^2 + 2) = 1 - 3.464102/3.741657 = 0.074180
    assert (res["n"], res["seeds"]) == (3, [0, 1, 2])
    assert [res["mean_diff"], res["se"], res["t"], res["p"]] == pytest.approx([0.2, 0.057735, 3.464102, 0.074180], abs=1e-6)
    assert "p = 0.074: not significant at 0.05" in A.paired_text(res, "val_generated/valid_seen/success", "generated games")
    assert "p = 1.7e-04: significant" in A.paired_text(res | {"p": 1.7e-4}, "m", "generated games")
    same = A.paired(finals.assign(value=0.5), "grpo", "stepopsd")
    assert same["mean_diff"] == 0 and math.isnan(same["t"])
    assert "every difference is equal" in A.paired_text(same, "m", "generated games")
    with pytest.raises(ValueError, match="share no seed"):
        A.paired(finals[~((finals.arm == "grpo") & (finals.seed < 3))], "grpo", "stepopsd")
    with pytest.raises(ValueError, match="one row per run"):
        A.paired(toy_runs(tmp_path / "again")[lambda d: d.metric.str.startswith("val")], "grpo", "stepopsd")


def test_validation_metrics_follow_the_runs_split_order(tmp_path):
    header = "epoch,step,train_step,val_generated/train/success,val_generated/valid_seen/success,val_generated/valid_seen/success_heat\n"
    write_run(tmp_path / "a", header + ",,0,0.5,0.25,0.25\n", val_splits=["valid_seen", "train"])
    runs = A.runs_frame([str(tmp_path / "a")])
    assert A.validation_metrics(runs) == ["val_generated/valid_seen/success", "val_generated/train/success"]
    assert A.validation_metrics(runs.drop(columns="val_splits")) == ["val_generated/train/success",
                                                                     "val_generated/valid_seen/success"]  # by name


def test_run_mean_averages_each_runs_training_metric_over_its_steps(tmp_path):
    header = "epoch,step,success/rate,train_step,val_generated/valid_seen/success\n"
    write_run(tmp_path / "a", header + ",,,0,0.0\n0,0,0.25,1,\n1,1,0.5,2,\n2,2,0.0,3,\n", seed=0)
    write_run(tmp_path / "b", header + "0,0,1.0,1,\n", algorithm="grpo", seed=0)
    means = A.run_mean(A.runs_frame(A.find_runs(str(tmp_path / "*"))), "success/rate").set_index("arm")
    assert means.loc["stepopsd", ["value", "steps"]].tolist() == pytest.approx([0.25, 3])  # (0.25 + 0.5 + 0) / 3
    assert means.loc["grpo", ["value", "steps", "seed"]].tolist() == [1.0, 1, 0]
    assert A.paired(means.reset_index(), "grpo", "stepopsd")["mean_diff"] == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="no metric 'reward/mean'"):
        A.run_mean(A.runs_frame([str(tmp_path / "a")]), "reward/mean")


def test_curves_and_task_bars_draw_the_means_with_their_errors_and_say_generated(tmp_path):
    runs = toy_runs(tmp_path)
    ax = A.curves(runs, "val_generated/valid_seen/success")
    assert "(generated games" in ax.get_title() and ax.get_xlabel() == "training step"
    # two measured steps (0 and 2): markers with ± SE bars and no line between them (nothing was measured at step
    # 1), the two arms dodged apart by ±0.02 x the step span (2), the y-axis from 0
    assert [c.get_label() for c in ax.containers] == ["grpo (n=3)", "stepopsd (n=3)"]
    marks = [c.lines[0] for c in ax.containers]
    assert [m.get_linestyle() for m in marks] == ["None", "None"]
    assert [m.get_ydata().tolist() for m in marks] == [pytest.approx([0.0, 0.2]), pytest.approx([0.0, 0.4])]
    assert [m.get_xdata().tolist() for m in marks] == [pytest.approx([-0.02, 1.98]), pytest.approx([0.02, 2.02])]
    bar = ax.containers[0].lines[2][0].get_segments()[1]  # grpo at step 2: 0.2 ± 0.1/sqrt(3)
    assert bar[:, 1].tolist() == pytest.approx([0.2 - 0.057735, 0.2 + 0.057735], abs=1e-6)
    assert ax.get_ylim()[0] == 0
    three = A.runs_frame([write_run(tmp_path / f"c{s}", HEADER + f",,0,,,0.0\n,,1,,,{v}\n,,2,,,0.5\n", seed=s)
                          for s, v in ((0, 0.25), (1, 0.75))])
    ax = A.curves(three, "val_generated/valid_seen/success")  # 3 measured steps: a line through marked points
    (line,) = ax.lines
    assert line.get_marker() == "o" and line.get_ydata().tolist() == pytest.approx([0.0, 0.5, 0.5])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # mean ± SE: step 1 has 0.5 ± 0.353553/sqrt(2) = 0.25
    assert band.max() == pytest.approx(0.75) and band.min() == pytest.approx(0.0) and ax.get_ylim()[0] == 0
    heat = HEADER.replace("success\n", "success,val_generated/valid_seen/success_heat\n")
    bars = A.runs_frame([write_run(tmp_path / f"b{s}", heat + f",,1,,,0.5,{v}\n", seed=s) for s, v in ((0, 0.25), (1, 0.75))])
    ax = A.task_bars(bars)
    assert [p.get_height() for p in ax.patches] == [0.5] and "generated games" in ax.get_title()
    (segment,) = ax.containers[0].lines[2][0].get_segments()  # mean 0.5 +- SE 0.353553/sqrt(2) = 0.25
    assert segment[:, 1].tolist() == pytest.approx([0.25, 0.75])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["heat"]
    with pytest.raises(ValueError, match="_<type>"):
        A.task_bars(runs)


def make_study(storage, name="toy"):
    """A 2 x 2 grid, 2 seeds per trial, plus a PRUNED and a FAIL trial: what the sweeper stores."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    grid = {A.ALPHA: optuna.distributions.CategoricalDistribution([0.05, 0.2]),
            A.LAM: optuna.distributions.CategoricalDistribution([0.1, 0.2])}
    for (alpha, lam), values in {(0.05, 0.1): [0.2, 0.4], (0.05, 0.2): [0.5, 0.5], (0.2, 0.1): [0.1, None],
                                 (0.2, 0.2): [0.6, 0.8]}.items():
        study.enqueue_trial({A.ALPHA: alpha, A.LAM: lam})
        t = study.ask(grid)
        t.set_user_attr("seeds", [0, 1])
        t.set_user_attr("seed_values", values)
        study.tell(t, sum(v for v in values if v is not None) / sum(v is not None for v in values))
    study.enqueue_trial({A.ALPHA: 0.05, A.LAM: 0.1})
    study.tell(study.ask(grid), state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_study_frame_and_the_heatmap_annotate_mean_and_spread_over_seeds(scheme, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db" if scheme == "sqlite" else f"journal:///{tmp_path}/s.log"
    if scheme == "sqlite":
        make_study(storage)
    else:
        make_study(optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{tmp_path}/s.log")))
    study = A.study_frame(storage, "toy")
    assert study["state"].tolist() == ["COMPLETE"] * 4 + ["PRUNED", "FAIL"]
    assert study.loc[0, [A.ALPHA, A.LAM, "value"]].tolist() == pytest.approx([0.05, 0.1, 0.3])
    assert study.loc[0, "seed_values"] == [0.2, 0.4] and study.loc[5, "seeds"] is None
    assert study.attrs["direction"] == "MAXIMIZE"
    cells = A.cells(study).set_index([A.ALPHA, A.LAM])
    # (0.05, 0.1): 0.2, 0.4 -> mean 0.3, sd 0.141421, SE 0.1; (0.2, 0.1): the crashed seed's None dropped, n = 1
    assert cells.loc[(0.05, 0.1)].tolist() == pytest.approx([0.3, 0.1, 2])
    assert cells.loc[(0.2, 0.1), "n"] == 1 and math.isnan(cells.loc[(0.2, 0.1), "se"])
    ax = A.heatmap(study, "generated games", metric="val_generated/valid_seen/success")
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0.100\n± n/a (n=1)", "0.300\n± 0.100 (n=2)", "0.500\n± 0.000 (n=2)", "0.700\n± 0.100 (n=2)"]
    assert "(generated games)" in ax.get_title() and ax.get_xlabel() == A.ALPHA
    colourbar = ax.figure.axes[-1]  # labelled with the metric, its scale from 0 (every mean is >= 0)
    assert colourbar.get_ylabel() == "val_generated/valid_seen/success" and ax.images[0].get_clim()[0] == 0


def test_a_missing_study_file_says_to_pass_the_storage_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="hydra.sweeper.storage"):
        A.study_frame(f"sqlite:///{tmp_path}/none.db", "toy")
    assert not (tmp_path / "none.db").exists()  # reading never creates an empty study file


def test_paired_gives_its_t_interval_and_the_equivalence_test_and_says_them(tmp_path):
    finals = A.final(toy_runs(tmp_path), "val_generated/valid_seen/success")
    res = A.paired(finals, "grpo", "stepopsd", delta=0.5)
    # d = 0.1, 0.2, 0.3 (test_analysis_stats.py works these out): 95 % CI 0.2 ± 4.302653·0.057735 = [-0.0484, 0.4484];
    # TOST within ±0.5: p_lower = 0.003367, p_upper = 0.017549 -> p = 0.017549
    assert res["ci"] == pytest.approx((-0.048414, 0.448414), abs=1e-6) and res["sd"] == pytest.approx(0.1)
    assert [res["tost"]["p_lower"], res["tost"]["p"]] == pytest.approx([0.003367, 0.017549], abs=1e-6)
    text = A.paired_text(res, "m", "generated games")
    assert "95 % CI [-0.0484, +0.4484]" in text
    assert text.endswith("p = 0.074: not significant at 0.05; equivalence (TOST) within ±0.5: p = 0.018 (equivalent at 0.05)")


def test_runs_of_one_seed_are_averaged_into_one_value_before_the_paired_test(tmp_path):
    finals = A.final(toy_runs(tmp_path), "val_generated/valid_seen/success")
    again = finals[finals.arm == "grpo"].assign(value=lambda d: d["value"] + 0.2, run_dir=lambda d: d["run_dir"] + "-rerun")
    both = pd.concat([finals, again])  # grpo seeds 0-2 run twice: 0.1/0.3, 0.2/0.4, 0.3/0.5
    with pytest.raises(ValueError, match="per_seed"):
        A.paired(both, "grpo", "stepopsd")
    seeds = A.per_seed(both, "arm")
    grpo = seeds[seeds.arm == "grpo"]
    assert grpo["value"].tolist() == pytest.approx([0.2, 0.3, 0.4]) and grpo["runs"].tolist() == [2, 2, 2]
    res = A.paired(seeds, "grpo", "stepopsd")  # d = 0.0, 0.1, 0.2 on 3 seeds (not 6 runs): mean 0.1, SE 0.057735
    assert (res["n"], res["mean_diff"], res["se"]) == (3, pytest.approx(0.1), pytest.approx(0.057735, abs=1e-6))


def test_cells_count_a_retried_trial_on_the_same_seeds_once():
    study = pd.DataFrame([
        {"number": 0, "state": "COMPLETE", "value": 0.3, A.ALPHA: 0.05, A.LAM: 0.1, "seeds": [0, 1], "seed_values": [0.2, 0.4]},
        {"number": 1, "state": "COMPLETE", "value": 0.5, A.ALPHA: 0.05, A.LAM: 0.1, "seeds": [0, 1], "seed_values": [0.4, 0.6]},
        {"number": 2, "state": "COMPLETE", "value": 0.7, A.ALPHA: 0.2, A.LAM: 0.1, "seeds": None, "seed_values": None}])
    c = A.cells(study).set_index([A.ALPHA, A.LAM])
    # seed 0: (0.2 + 0.4)/2 = 0.3, seed 1: (0.4 + 0.6)/2 = 0.5 -> mean 0.4, SD 0.141421, SE 0.1, n = 2 seeds (not 4)
    assert c.loc[(0.05, 0.1)].tolist() == pytest.approx([0.4, 0.1, 2])
    assert c.loc[(0.2, 0.1), "n"] == 1  # no per-seed values stored: the trial's value, one unit


def test_collect_copies_a_run_into_the_committed_layout_that_reads_back_the_same(tmp_path):
    run = write_run(tmp_path / "outputs" / "job", overrides=["algorithm.stepopsd.budget_clip=null", "seed=3"],
                    seed=3, budget_clip=None)
    dest = A.collect_run(run, str(tmp_path / "study" / "runs" / "heat"))
    assert os.path.relpath(dest, tmp_path) == os.path.join("study", "runs", "heat", "stepopsd_budget_clip=null", "seed3")
    assert sorted(os.listdir(dest)) == sorted(A.COMMITTED) and A.is_committed_run(dest)
    assert A.run_info(dest) | {"run_dir": None} == A.run_info(run) | {"run_dir": None}
    assert A.run_frame(dest).equals(A.run_frame(run)) and A.resolved_config(dest) == A.resolved_config(run)
    assert A.find_runs(str(tmp_path / "study" / "runs" / "heat" / "*" / "seed*")) == [dest]
    assert A.collect(str(tmp_path / "outputs" / "*"), str(tmp_path / "study" / "runs" / "heat")) == {run: dest}  # again: a no-op
    other = write_run(tmp_path / "outputs2" / "job", HEADER + ",,0,,,0.75\n", overrides=["algorithm.stepopsd.budget_clip=null"],
                      seed=3, budget_clip=None)
    with pytest.raises(FileExistsError, match="another run of arm 'stepopsd budget_clip=null', seed 3"):
        A.collect_run(other, str(tmp_path / "study" / "runs" / "heat"))
    A.collect_run(other, str(tmp_path / "study" / "runs" / "heat"), replace=True)
    assert A.run_frame(dest)["value"].tolist() == [0.75]


def test_a_config_with_hydra_interpolations_is_resolved_from_the_runs_own_hydra_yaml(tmp_path):
    run = write_run(tmp_path / "job")
    cfg = tmp_path / "job" / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text() + "paths:\n  output_dir: ${hydra:runtime.output_dir}\n  log: ${paths.output_dir}/log\n")
    hydra = tmp_path / "job" / ".hydra" / "hydra.yaml"
    hydra.write_text(yaml.safe_dump({"hydra": {"runtime": {"output_dir": "/somewhere/job", "choices": {
        "experiment": "alfworld_heat", "env": "alfworld"}}}}))
    assert A.resolved_config(run)["paths"] == {"output_dir": "/somewhere/job", "log": "/somewhere/job/log"}


def test_a_study_exported_to_json_reads_back_as_the_study_with_its_committed_runs(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    make_study(storage)
    path = str(tmp_path / "study" / "runs" / "heat" / "study.json")
    A.export_study(storage, "toy", path)
    exported, original = A.study_frame(path), A.study_frame(storage, "toy")
    columns = ["number", "state", "value", A.ALPHA, A.LAM, "seeds", "seed_values"]
    assert exported[columns].astype(str).equals(original[columns].astype(str))
    assert exported.attrs == {"direction": "MAXIMIZE", "study_name": "toy", "optimization_results": None}
    assert exported["runs"].tolist() == [[]] * 6  # the toy trials stored no job dirs
    assert A.cells(exported).equals(A.cells(original))
    with pytest.raises(ValueError, match="holds study 'toy'"):
        A.study_frame(path, "other")
    with pytest.raises(FileNotFoundError, match="export_study"):
        A.study_frame(str(tmp_path / "none.json"))


def test_blocks_of_a_readme_are_written_in_place_and_read_back(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Study\n\ntext\n")
    A.write_block(str(readme), "summarise.py heat", "| a | b |\n")
    assert A.read_block(str(readme), "summarise.py heat") == "| a | b |\n" and A.read_block(str(readme), "other") is None
    readme.write_text(readme.read_text() + "\n## After\n")
    A.write_block(str(readme), "summarise.py heat", "new\n")
    text = readme.read_text()
    assert A.read_block(str(readme), "summarise.py heat") == "new\n" and text.startswith("# Study\n\ntext\n")
    assert text.endswith("<!-- END summarise.py heat -->\n\n## After\n") and "| a | b |" not in text


def test_differences_draw_each_paired_interval_with_the_equivalence_margin(tmp_path):
    finals = A.final(toy_runs(tmp_path), "val_generated/valid_seen/success")
    res = A.paired(finals, "grpo", "stepopsd")
    ax = A.differences([res, res | {"label": "again"}], "m", "generated games", delta=0.05)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stepopsd - grpo (n=3)", "again"]
    (bar,) = ax.containers[0].lines[2]  # 0.2 ± 4.302653·0.057735
    assert bar.get_segments()[0][:, 0].tolist() == pytest.approx([-0.048414, 0.448414], abs=1e-6)
    assert sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--" and len(line.get_xdata())) == \
        pytest.approx([-0.05, 0.05])
    assert "generated games" in ax.get_title() and "95 % t-intervals" in ax.get_title()
