import os
import sys
import sysconfig

# Spawned worker processes inherit sys.path; make tests/ importable there (the `helpers` package: toy_engines).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402

import stepopsd.schemas  # noqa: E402,F401  the typed schemas every composed config of conf/ stands on

# One generated game per task type and split, shared by the ALFWorld tests (about a minute on 2 cores).
GAMES_ARGS = dict(seed=0, train_per_type=1, valid_per_type=1, workers=2)


@pytest.fixture(scope="session")
def console_script():
    """`console_script(name)`: the path of an installed console script (stepopsd-retriever, ...) in the running
    interpreter's environment, so a test runs it as users do even when that environment is not activated."""
    def path(name: str) -> str:
        for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        pytest.fail(f"{name} is not installed in the environment of {sys.executable}: run `{sys.executable} -m pip install -e .`")
    return path


@pytest.fixture(scope="session")
def generated_games(tmp_path_factory):
    from stepopsd.envs.alfworld.generate import make_games

    out = tmp_path_factory.mktemp("games")
    report = make_games(str(out), log=lambda *_: None, **GAMES_ARGS)
    return out, report


def sweep_command(games, cache, out, *overrides, search="two_knob_grid"):
    """`python train.py -m hparams_search=<search> ...` on the tiny configuration, its study in `out`/study.db."""
    from helpers.runs import tiny_overrides

    tiny = [o for o in tiny_overrides(games, cache, out) if not o.startswith("hydra.run.dir")]
    return [sys.executable, "train.py", "-m", f"hparams_search={search}", "experiment=alfworld_heat", "machine=cpu", *tiny,
            f"hydra.sweeper.storage=sqlite:///{out}/study.db", f"hydra.sweep.dir={out}/multirun", *overrides]


@pytest.fixture(scope="session")
def tiny_study(generated_games, tmp_path_factory):
    """A real tiny two-knob sweep: the grid alpha_clip {0.05, 0.2} x lam0 {0.1}, 2 seeds per trial (4 tiny
    runs of 2 training steps, validation after every step): {storage, study_name, multirun_dir, stdout}."""
    import subprocess

    out = tmp_path_factory.mktemp("tiny-study")
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"  # the tiny SFT policy other e2e tests share
    cmd = sweep_command(str(generated_games[0]), cache, out, "algorithm.stepopsd.alpha_clip=choice(0.05,0.2)",
                        "algorithm.stepopsd.lam0=choice(0.1)", "hydra.sweeper.study_name=tiny")
    proc = subprocess.run(cmd, cwd=os.path.dirname(_TESTS_DIR), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"storage": f"sqlite:///{out}/study.db", "study_name": "tiny", "multirun_dir": str(out / "multirun"),
            "stdout": proc.stdout}


@pytest.fixture(scope="session")
def tiny_multirun(generated_games, tmp_path_factory):
    """4 real tiny runs sharing one SFT warm start (paths.cache_dir), made by one Hydra multirun
    (`train.py -m experiment=alfworld_heat machine=cpu algorithm=grpo,stepopsd seed=0,1`, 2 training steps,
    validation at every step: the basic launcher runs the 4 jobs one after another in one process, about 30 s
    instead of 4 x 25 s of separate processes); returns the sweep folder (jobs 0-3)."""
    from helpers.runs import run_train, tiny_overrides

    out = tmp_path_factory.mktemp("tiny-multirun")
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"
    tiny = [o for o in tiny_overrides(str(generated_games[0]), cache, out) if not o.startswith("hydra.run.dir")]
    proc = run_train("-m", "experiment=alfworld_heat", "machine=cpu", "algorithm=grpo,stepopsd", "seed=0,1", *tiny,
                     f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
