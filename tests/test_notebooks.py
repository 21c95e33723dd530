"""The notebooks executed end to end with nbclient on real tiny runs: 4 jobs of `train.py` (grpo and stepopsd,
seeds 0 and 1, 2 training steps, validation at every step) and a real tiny Optuna sweep (conftest's `tiny_study`). read_run runs
under the kernel's inline backend (the figures are displayed), the other two under MPLBACKEND=Agg (the figures
are only saved): the notebooks hold no backend-specific code."""
import os
import shutil

import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from stepopsd import analysis as A

from helpers.runs import ROOT


@pytest.fixture(scope="module")
def tiny_runs(tiny_multirun):
    """{(algorithm, seed): run dir} of conftest's 4 tiny runs (`train.py -m algorithm=grpo,stepopsd seed=0,1`)."""
    runs = {(A.run_info(d)["algorithm"], A.run_info(d)["seed"]): d for d in A.find_runs(str(tiny_multirun / "*"))}
    assert sorted(runs) == [("grpo", 0), ("grpo", 1), ("stepopsd", 0), ("stepopsd", 1)]
    return runs


def execute(name, folder, monkeypatch, backend=None, **env):
    """Run notebooks/<name>.ipynb top to bottom in a fresh kernel with `env` set; returns the executed notebook
    and {figure name: PNG path} of what it saved into <folder>/figures."""
    path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not stored, f"{path} is stored with outputs: clear them (jupyter nbconvert --clear-output --inplace {path})"
    for key, value in {"STEPOPSD_FIGURES": str(folder / "figures"), **env}.items():
        monkeypatch.setenv(key, value)
    if backend:
        monkeypatch.setenv("MPLBACKEND", backend)
    else:
        monkeypatch.delenv("MPLBACKEND", raising=False)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    figures = {f[:-4]: str(folder / "figures" / f) for f in os.listdir(folder / "figures")}
    assert all(matplotlib.image.imread(p).shape[0] > 100 for p in figures.values())  # real rendered images
    return nb, figures


def texts(nb):
    return "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for c in nb.cells for o in c.get("outputs", []))


def test_run_info_says_what_each_tiny_run_was(tiny_runs):
    for (algorithm, seed), run in tiny_runs.items():
        info = A.run_info(run)
        assert (info["algorithm"], info["arm"], info["seed"], info["experiment"]) == (algorithm, algorithm, seed, "alfworld_heat")
        assert (info["data"], info["task_types"], info["env"]) == ("generated", "heat", "alfworld")
        assert (info["alpha_clip"] is None) == (algorithm == "grpo")
        val = A.run_frame(run).query("metric == 'val_generated/valid_seen/success'")
        assert val["step"].tolist() == [0, 1, 2]  # training_steps=2, val_every=1: start, after each step


def test_read_run_notebook(tiny_runs, tmp_path, monkeypatch):
    nb, figures = execute("read_run", tmp_path, monkeypatch, STEPOPSD_RUN=tiny_runs["stepopsd", 0])
    assert set(figures) == {"rollout_and_validation", "actor", "stepopsd"}
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3
    assert "alfworld_heat" in texts(nb) and "val_generated/valid_seen/success" in texts(nb)


def other_experiment(run, folder):
    """A copy of a tiny run relabelled as another experiment (hydra.yaml's choice), to mix into a runs list."""
    copy = folder / "pick_two-run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "policy"))
    hydra = copy / ".hydra" / "hydra.yaml"
    hydra.write_text(hydra.read_text().replace("experiment: alfworld_heat", "experiment: alfworld_pick_two"))
    return str(copy)


def test_compare_runs_notebook(tiny_runs, tmp_path, monkeypatch):
    sweep = os.path.dirname(tiny_runs["grpo", 0])  # a glob of every job, two of them again as plain paths, and
    spec = os.pathsep.join([os.path.join(sweep, "**"), tiny_runs["stepopsd", 0], tiny_runs["stepopsd", 1],
                            other_experiment(tiny_runs["grpo", 0], tmp_path)])  # a run of another experiment
    nb, figures = execute("compare_runs", tmp_path, monkeypatch, backend="Agg", STEPOPSD_RUNS=spec,
                          STEPOPSD_EXPERIMENT="alfworld_heat")
    assert set(figures) == {"curves", "task_types"}
    runs = A.runs_frame(sorted(tiny_runs.values()))
    metric = "val_generated/valid_seen/success"
    res = A.paired(A.per_seed(A.final(runs, metric), "arm"), "grpo", "stepopsd", delta=0.05)
    assert res["n"] == 2
    assert A.paired_text(res, metric, "generated games") in texts(nb)
    monkeypatch.delenv("STEPOPSD_EXPERIMENT")
    with pytest.raises(CellExecutionError, match="set STEPOPSD_EXPERIMENT to one of them"):
        execute("compare_runs", tmp_path, monkeypatch, backend="Agg", STEPOPSD_RUNS=spec)


def test_compare_runs_and_read_run_read_a_studys_committed_runs_by_default(tiny_runs, tmp_path, monkeypatch):
    study = tmp_path / "study"
    copies = A.collect(os.pathsep.join(tiny_runs.values()), str(study / "runs" / "heat"))
    monkeypatch.delenv("STEPOPSD_RUNS", raising=False)
    nb, figures = execute("compare_runs", tmp_path, monkeypatch, backend="Agg", STEPOPSD_STUDY=str(study),
                          STEPOPSD_SETTING="heat")
    assert set(figures) == {"curves", "task_types"}
    runs = A.runs_frame(sorted(copies.values()))
    metric = "val_generated/valid_seen/success"
    res = A.paired(A.per_seed(A.final(runs, metric), "arm"), "grpo", "stepopsd", delta=0.05)
    assert A.paired_text(res, metric, "generated games") in texts(nb)
    nb, _ = execute("read_run", tmp_path, monkeypatch, backend="Agg", STEPOPSD_RUN=copies[tiny_runs["stepopsd", 1]])
    assert "alfworld_heat" in texts(nb) and "val_generated/valid_seen/success" in texts(nb)
    (tmp_path / "empty").mkdir()  # a study whose runs are not committed says so
    with pytest.raises(CellExecutionError, match="no committed runs under"):
        execute("compare_runs", tmp_path, monkeypatch, backend="Agg", STEPOPSD_STUDY=str(tmp_path / "empty"))


def test_two_knob_notebook(tiny_study, tmp_path, monkeypatch):
    nb, figures = execute("two_knob", tmp_path, monkeypatch, backend="Agg",
                          STEPOPSD_STUDY_STORAGE=tiny_study["storage"], STEPOPSD_STUDY_NAME=tiny_study["study_name"])
    assert set(figures) == {"two_knob"}
    study = A.study_frame(tiny_study["storage"], tiny_study["study_name"])
    done = study[study["state"] == "COMPLETE"].sort_values("value", ascending=study.attrs["direction"] == "MINIMIZE")
    best = done.iloc[0]
    out = texts(nb)
    assert f"best trial {best['number']}: {A.ALPHA}={best[A.ALPHA]:g}, {A.LAM}={best[A.LAM]:g}" in out
    assert "on generated games" in out  # the data label read from the trials' own runs
    assert "best_params" in out  # the sweeper's optimization_results.yaml, shown next to the table


def test_two_knob_notebook_on_a_committed_study_export(tiny_study, tmp_path, monkeypatch):
    path = A.collect_study(tiny_study["storage"], tiny_study["study_name"], str(tmp_path / "study" / "runs" / "heat"))
    monkeypatch.delenv("STEPOPSD_STUDY_NAME", raising=False)
    nb, figures = execute("two_knob", tmp_path, monkeypatch, backend="Agg", STEPOPSD_STUDY_STORAGE=path)
    assert set(figures) == {"two_knob"}
    out = texts(nb)
    assert "on generated games" in out and "best_params" in out  # the data label from the committed runs; the record
    assert "best trial" in out and tiny_study["study_name"] in out
