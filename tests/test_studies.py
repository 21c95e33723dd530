"""Every study under experiments/ (a folder with a summarise.py) regenerates from what it commits.

A study with committed runs (`runs/<setting>/<arm>/seed<k>/`, see experiments/collect.py): its summarise.py, run
into a temporary folder, rewrites every committed `<setting>/summary.md` byte for byte and every figure they name,
and the README's marked block `summarise.py <setting>` is that summary (the numbers the README quotes are the
code's). A study without committed runs: its README must say plainly that its tables cannot be regenerated from
committed data. A study with a reanalyse.py (what can be recomputed from committed aggregates): the same for its
`reanalysis.md` and the README block `reanalyse.py`. Then the pipeline itself, collect -> summarise -> this
check, on real tiny runs (a `train.py -m` multirun, and conftest's real tiny sweep), and that the check fails when
a committed number, a README block or the plain statement is wrong."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from stepopsd import analysis as A

from helpers.runs import ROOT

STUDIES = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(ROOT, "experiments", "*", "summarise.py")))
NOT_REGENERABLE = "cannot be regenerated from committed data"


def committed_settings(study: str) -> list[str]:
    """The settings under <study>/runs/ that hold at least one committed run."""
    return sorted({os.path.basename(os.path.dirname(os.path.dirname(d)))
                   for d in glob.glob(os.path.join(study, "runs", "*", "*", "seed*")) if A.is_committed_run(d)})


def run_script(path: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, path, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"MPLBACKEND": "Agg"})
    assert proc.returncode == 0, f"{path} {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def figures_named(text: str) -> list[str]:
    return [w.strip("`.,()") for w in text.split() if w.strip("`.,()").endswith(".png")]


def check_study(study: str, tmp, scripts: str | None = None) -> None:
    """The checks of the module docstring for the study folder `study`, its scripts in `scripts` (default:
    the study folder itself); regenerated files go under `tmp`."""
    scripts = scripts or study
    readme = read(os.path.join(study, "README.md"))
    settings = committed_settings(study)
    if not settings:
        assert NOT_REGENERABLE in readme, (
            f"{study}: no committed runs under runs/, and its README does not say plainly that its tables "
            f"{NOT_REGENERABLE} (or commit the runs: experiments/collect.py)")
    else:
        out = tmp / "summarise"
        run_script(os.path.join(scripts, "summarise.py"), "--study", study, "--out", str(out))
        for setting in settings:
            regenerated = read(out / setting / "summary.md")
            committed = os.path.join(study, setting, "summary.md")
            assert os.path.exists(committed), f"{study}: runs/{setting} is committed but {setting}/summary.md is not"
            assert read(committed) == regenerated, f"{committed} differs from what summarise.py computes from runs/{setting}"
            assert A.read_block(os.path.join(study, "README.md"), f"summarise.py {setting}") == regenerated, (
                f"{study}/README.md: the block 'summarise.py {setting}' differs from {setting}/summary.md "
                f"(run summarise.py --readme)")
            for fig in figures_named(regenerated):
                assert os.path.exists(out / fig), f"summarise.py did not regenerate {fig}"
                assert os.path.exists(os.path.join(study, fig)), f"{study}: {fig} is named but not committed"
    if os.path.exists(os.path.join(study, "reanalyse.py")):  # it reads the study's own legacy/ folder
        out = tmp / "reanalyse"
        run_script(os.path.join(study, "reanalyse.py"), "--out", str(out))
        regenerated = read(out / "reanalysis.md")
        assert read(os.path.join(study, "reanalysis.md")) == regenerated, f"{study}/reanalysis.md differs from reanalyse.py's"
        assert A.read_block(os.path.join(study, "README.md"), "reanalyse.py") == regenerated, (
            f"{study}/README.md: the block 'reanalyse.py' differs from reanalysis.md (run reanalyse.py --readme)")
        for fig in figures_named(regenerated):
            assert os.path.exists(out / fig) and os.path.exists(os.path.join(study, fig)), fig


def test_there_are_studies():
    assert {os.path.basename(s) for s in STUDIES} >= {"stepopsd_vs_grpo", "two_knob"}


@pytest.mark.parametrize("study", STUDIES, ids=os.path.basename)
def test_every_study_regenerates_from_what_it_commits(study, tmp_path):
    check_study(study, tmp_path)


@pytest.mark.parametrize("study", STUDIES, ids=os.path.basename)
def test_every_study_run_script_collects_its_runs_into_the_study_folder(study):
    run_sh = read(os.path.join(study, "run.sh"))
    assert "experiments/collect.py" in run_sh and f"experiments/{os.path.basename(study)}/runs/" in run_sh
    assert "summarise.py" in run_sh


# --- the pipeline on real tiny runs (conftest's tiny_multirun and tiny_study) --------------------------------

def test_collect_then_summarise_regenerates_a_study_and_the_check_catches_any_drift(tiny_multirun, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "README.md").write_text("# A tiny study\n\nThe runs were made by this test; nothing here is a result.\n")
    run_script(os.path.join(ROOT, "experiments", "collect.py"), os.path.join(str(tiny_multirun), "*"),
               "--to", str(study / "runs" / "heat"))
    copies = sorted(glob.glob(str(study / "runs" / "heat" / "*" / "seed*")))
    assert [os.path.relpath(c, study) for c in copies] == [
        "runs/heat/grpo/seed0", "runs/heat/grpo/seed1", "runs/heat/stepopsd/seed0", "runs/heat/stepopsd/seed1"]
    for copy in copies:  # the committed copy reads back as the run itself: metrics, config, arm, seed
        assert sorted(os.listdir(copy)) == sorted(A.COMMITTED)
        (original,) = [d for d in A.find_runs(os.path.join(str(tiny_multirun), "*"))
                       if (A.run_info(d)["arm"], A.run_info(d)["seed"]) == (A.run_info(copy)["arm"], A.run_info(copy)["seed"])]
        assert A.run_info(copy) | {"run_dir": None} == A.run_info(original) | {"run_dir": None}
        assert A.run_frame(copy).equals(A.run_frame(original))
        assert "${" not in read(os.path.join(copy, "config.yaml"))  # resolved
    # collecting again is a no-op; another run of a committed arm and seed is refused
    stamps = {c: os.path.getmtime(os.path.join(c, "metrics.csv")) for c in copies}
    again = A.collect(os.path.join(str(tiny_multirun), "*"), str(study / "runs" / "heat"))
    assert sorted(again.values()) == copies and stamps == {c: os.path.getmtime(os.path.join(c, "metrics.csv")) for c in copies}
    other = tmp_path / "other"
    shutil.copytree(copies[0], other)
    (other / "metrics.csv").write_text(read(other / "metrics.csv").replace("0.0", "0.25", 1))
    with pytest.raises(FileExistsError, match="--replace"):
        A.collect_run(str(other), str(study / "runs" / "heat"))

    scripts = os.path.join(ROOT, "experiments", "stepopsd_vs_grpo")
    run_script(os.path.join(scripts, "summarise.py"), "--study", str(study), "--readme")
    summary = read(study / "heat" / "summary.md")
    assert "runs/heat/" in summary and "generated games" in summary and "stepopsd - grpo | 2 |" in summary
    assert os.path.exists(study / "heat" / "val_generated_valid_seen_success.png")
    check_study(str(study), tmp_path / "check", scripts)

    # drift is caught: a committed number changed, the README block edited, the plain statement missing
    metrics = study / "runs" / "heat" / "grpo" / "seed1" / "metrics.csv"
    good = read(metrics)
    lines = good.splitlines()
    header = lines[0].split(",")
    col = header.index("val_generated/valid_seen/success")
    last = max(i for i, line in enumerate(lines) if line.split(",")[col] != "" and i > 0)
    cells = lines[last].split(",")
    cells[col] = "0.75"
    metrics.write_text("\n".join(lines[:last] + [",".join(cells)] + lines[last + 1:]) + "\n")
    with pytest.raises(AssertionError, match="differs from what summarise.py computes"):
        check_study(str(study), tmp_path / "drift1", scripts)
    metrics.write_text(good)
    readme = read(study / "README.md")
    (study / "README.md").write_text(readme.replace("| stepopsd - grpo | 2 |", "| stepopsd - grpo | 3 |", 1))
    with pytest.raises(AssertionError, match="block 'summarise.py heat' differs"):
        check_study(str(study), tmp_path / "drift2", scripts)
    shutil.rmtree(study / "runs")
    (study / "README.md").write_text("# A study whose runs are gone\n")
    with pytest.raises(AssertionError, match="does not say plainly"):
        check_study(str(study), tmp_path / "drift3", scripts)
    (study / "README.md").write_text(f"# A study whose runs are gone\n\nIts tables {NOT_REGENERABLE}.\n")
    check_study(str(study), tmp_path / "drift4", scripts)


def test_a_sweep_is_collected_with_its_study_export_and_summarised(tiny_study, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "README.md").write_text("# A tiny sweep\n\nThe runs were made by this test; nothing here is a result.\n")
    run_script(os.path.join(ROOT, "experiments", "collect.py"), "--storage", tiny_study["storage"],
               "--study", tiny_study["study_name"], "--to", str(study / "runs" / "heat"))
    exported = A.study_frame(str(study / "runs" / "heat" / "study.json"))
    original = A.study_frame(tiny_study["storage"], tiny_study["study_name"])
    assert exported[["number", "state", "value", A.ALPHA, A.LAM]].equals(original[["number", "state", "value", A.ALPHA, A.LAM]])
    assert exported["seed_values"].tolist() == original["seed_values"].tolist()
    assert exported.attrs["study_name"] == tiny_study["study_name"] and exported.attrs["optimization_results"]["best_params"]
    assert all(A.is_committed_run(r) for rs in exported["runs"] for r in rs)
    scripts = os.path.join(ROOT, "experiments", "two_knob")
    run_script(os.path.join(scripts, "summarise.py"), "--study", str(study), "--readme")
    summary = read(study / "heat" / "summary.md")
    n_runs = sum(len(rs) for rs in exported["runs"])
    assert f"Per-seed values equal to their committed runs' final val_generated/valid_seen/success: {n_runs} of {n_runs}" in summary
    check_study(str(study), tmp_path / "check", scripts)
