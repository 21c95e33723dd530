"""The Optuna sweeper's search space and its use of Optuna's and Hydra's public APIs, in process (no training):
range(...) -> an int / float distribution with its step (the sampler sees the order), choice(...) -> categorical,
a GridSampler walking every point of a range, a killed sweep's trials recovered through the storage's public
methods, and a failed job's exception read through `JobReturn.return_value`."""
import re
import traceback
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import RangeSweep
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.stepopsd_optuna import optuna_sweeper
from hydra_plugins.stepopsd_optuna.optuna_sweeper import (OptunaSweeper, SweepError, distribution, done_trials,
                                                          grid_points, job_error, range_distribution)


@pytest.fixture(autouse=True)
def _current_sweeper_module():
    """Hydra's plugin scan (once per process, at its first use) re-executes every hydra_plugins module in place,
    making new classes: scan first, then bind this file's names to the module as it is now (names imported before a
    scan are stale: pytest.raises(SweepError) would not catch the new class)."""
    from hydra.core.plugins import Plugins

    Plugins.instance()
    for name in ("OptunaSweeper", "SweepError", "distribution", "done_trials", "grid_points", "job_error",
                 "range_distribution"):
        globals()[name] = getattr(optuna_sweeper, name)


def spec(text: str):
    """The parsed value of `key=<text>`, as the sweeper gets it from Hydra."""
    return OverridesParser.create().parse_overrides([f"k={text}"])[0].value()


@pytest.mark.parametrize("text, expected, points", [
    ("range(1,5)", IntDistribution(1, 4, step=1), [1, 2, 3, 4]),
    ("range(5)", IntDistribution(0, 4, step=1), [0, 1, 2, 3, 4]),
    ("range(1,10,2)", IntDistribution(1, 9, step=2), [1, 3, 5, 7, 9]),
    ("range(1,11,2)", IntDistribution(1, 9, step=2), [1, 3, 5, 7, 9]),
    ("range(10,0,-3)", IntDistribution(1, 10, step=3), [1, 4, 7, 10]),  # counting down: the same points, in order
    ("range(4,5)", IntDistribution(4, 4, step=1), [4]),
    ("range(0,1,0.25)", FloatDistribution(0.0, 0.75, step=0.25), [0.0, 0.25, 0.5, 0.75]),
    ("range(0.1,0.5,0.1)", FloatDistribution(0.1, 0.4, step=0.1), [0.1, 0.2, 0.3, 0.4]),  # 0.3, not 0.30000000000000004
    ("range(1,2.5,0.5)", FloatDistribution(1.0, 2.0, step=0.5), [1.0, 1.5, 2.0]),
    ("range(1.0,0,-0.25)", FloatDistribution(0.25, 1.0, step=0.25), [0.25, 0.5, 0.75, 1.0]),
])
def test_a_range_is_an_ordered_distribution_with_its_step(text, expected, points):
    dist = distribution("k", spec(text))
    assert type(dist) is type(expected) and dist == expected
    assert grid_points(dist) == points
    assert all(dist._contains(dist.to_internal_repr(p)) for p in points)  # every point is on the distribution's grid


def test_range_points_are_counted_in_decimal():
    points = grid_points(distribution("k", spec("range(0,1,0.1)")))
    assert points == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # 10 points, as written


def test_choice_stays_categorical_and_interval_stays_continuous():
    choice = distribution("k", spec("choice(0.2,0.05,0.1)"))
    assert choice == CategoricalDistribution([0.2, 0.05, 0.1]) and grid_points(choice) == [0.2, 0.05, 0.1]
    assert distribution("k", spec("interval(0.1,0.2)")) == FloatDistribution(0.1, 0.2)
    assert grid_points(FloatDistribution(0.1, 0.2)) is None  # no grid over a continuous interval
    assert distribution("k", spec("tag(int,interval(1,4))")) == IntDistribution(1, 4)
    assert distribution("k", spec("tag(log,interval(0.01,1))")) == FloatDistribution(0.01, 1, log=True)


@pytest.mark.parametrize("value, words", [
    (spec("range(3,3)"), "range(3, 3, 1) has no values"),
    (spec("range(3,1)"), "has no values"),
    (spec("tag(log,range(1,4))"), "tag(log, interval(a, b))"),
    (RangeSweep(start=1, stop=5, step=0), "the step must not be 0"),
])
def test_a_bad_range_is_a_one_line_sweep_error(value, words):
    with pytest.raises(SweepError, match=re.escape(words)) as e:
        range_distribution("algorithm.x", value)
    assert "\n" not in str(e.value) and str(e.value).startswith("hydra.sweeper.params.algorithm.x: range(")


def test_tpe_draws_only_the_points_of_a_range():
    space = {"a": distribution("a", spec("range(2,20,3)")), "b": distribution("b", spec("range(0,1,0.25)"))}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3), direction="maximize")
    for _ in range(12):
        trial = study.ask(space)
        assert trial.params["a"] in (2, 5, 8, 11, 14, 17) and trial.params["b"] in (0.0, 0.25, 0.5, 0.75)
        study.tell(trial, -abs(trial.params["a"] - 11) - trial.params["b"])


def sweeper(tmp_path, name, sampler=None, **kw):
    return OptunaSweeper(sampler=OmegaConf.create(sampler) if sampler else None, storage=f"sqlite:///{tmp_path}/s.db",
                         study_name=name, n_trials=None if sampler else 4, **kw)


def test_a_grid_sampler_walks_every_point_of_a_range_once(tmp_path):
    space = {"a": distribution("a", spec("range(1,8,3)")), "b": distribution("b", spec("range(0.5,1.5,0.5)")),
             "c": distribution("c", spec("choice(x,y)"))}
    grid = sweeper(tmp_path, "grid", {"_target_": "optuna.samplers.GridSampler", "seed": 0})
    assert grid._check(space) == 3 * 2 * 2  # n_trials null: the whole grid
    study = grid._study(space)
    asked = []
    for _ in range(12):
        trial = study.ask(space)
        asked.append((trial.params["a"], trial.params["b"], trial.params["c"]))
        optuna_sweeper.tell(study, trial, 1.0)
    assert sorted(asked) == sorted((a, b, c) for a in (1, 4, 7) for b in (0.5, 1.0) for c in ("x", "y"))
    assert all(type(a) is int for a, _, _ in asked)
    with pytest.raises(SweepError, match="GridSampler: give every parameter as choice"):
        grid._check({**space, "d": distribution("d", spec("interval(0.1,0.2)"))})


def test_a_killed_sweeps_running_trial_is_failed_and_asked_again(tmp_path):
    space = {"a": distribution("a", spec("range(0,10)"))}
    first = sweeper(tmp_path, "killed")
    study = first._study(space)
    study.tell(study.ask(space), 1.0)
    left_running = study.ask(space)  # the sweep is killed here: the trial stays RUNNING
    again = sweeper(tmp_path, "killed")
    resumed = again._study(space)
    again._recover(resumed)
    ts = resumed.get_trials()
    assert [t.state for t in ts] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert ts[1].user_attrs["interrupted"] is True and ts[2].user_attrs["retry_of"] == left_running.number
    assert [t.number for t in done_trials(resumed)] == [0]  # the interrupted trial does not count
    retry = resumed.ask(space)
    assert retry.number == 2 and retry.params == left_running.params


def crash():
    raise RuntimeError("the job crashed")


def test_a_failed_jobs_exception_is_read_through_the_public_property_and_nothing_is_printed(capsys):
    try:
        crash()
    except RuntimeError as e:
        crashed = e
    trace = traceback.format_exception(crashed)
    for exc in (ValueError("bad knob"), optuna.TrialPruned("pruned at step 2"), crashed):
        ret = JobReturn(overrides=["a=1"], status=JobStatus.FAILED)
        ret.return_value = exc  # Hydra's public setter, as its launchers do
        assert job_error(ret) is exc
    assert traceback.format_exception(crashed) == trace  # error.txt shows the job's traceback, nothing on top
    assert capsys.readouterr().err == ""


def test_the_sweeper_reads_no_private_attribute_of_optuna_or_hydra_objects():
    source = Path(optuna_sweeper.__file__).read_text()
    private = re.findall(r"(?<!\bself)\.(_[a-z]\w*)", source)
    assert private == [], private
