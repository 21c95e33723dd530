"""Progress lines for batch logs (stepopsd/progress.py, stepopsd/callbacks/progress.py): when they print, what
they say, and that a terminal gets the rich bar instead. The real run is in test_progress_e2e.py."""
import io
import logging
from types import SimpleNamespace

import pytest

from stepopsd.callbacks.progress import PlainProgressBar, progress_bar
from stepopsd.errors import UserError
from stepopsd.progress import Progress, duration, every_s, line, setup_console


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_one_line_at_most_every_interval_and_always_the_first_and_the_last():
    clock, out = Clock(), io.StringIO()
    with Progress("sft", 6, "batch", stream=out, every=30, clock=clock) as bar:
        for t in (1, 10, 29, 31, 45, 50):  # item k done at time t
            clock.now = t
            bar.advance(loss=0.5)
    lines = out.getvalue().splitlines()
    assert [ln.split(" · ")[0] for ln in lines] == ["[sft] batch 1/6", "[sft] batch 4/6", "[sft] batch 6/6"]
    assert lines[0] == "[sft] batch 1/6 · 17 % · 1.0s elapsed · ETA 5.0s · loss 0.500"
    assert lines[-1] == "[sft] batch 6/6 · 100 % · 50s elapsed · loss 0.500"  # done: no ETA


def test_the_last_line_once_even_when_updates_go_on():
    clock, out = Clock(), io.StringIO()
    with Progress("games", 2, "accepted", stream=out, every=30, clock=clock) as bar:
        for done, rejected in ((0, 1), (1, 1), (2, 1), (2, 2), (2, 3)):  # games still checked after the last accept
            clock.now += 1
            bar.update(done, rejected=rejected)
    assert [ln.split(" · ")[0] for ln in out.getvalue().splitlines()] == ["[games] accepted 0/2", "[games] accepted 2/2"]


def test_the_line_says_what_is_done_what_is_left_and_when_it_ends():
    assert line("sft", "batch", 30, 100, 72, {"epoch": "1/3", "loss": 0.1534}) == \
        "[sft] batch 30/100 · 30 % · 1m12s elapsed · ETA 2m48s · epoch 1/3 · loss 0.153"
    assert [duration(s) for s in (0.04, 9.84, 9.97, 59.4, 72, 3599.6, 3725)] == \
        ["0.0s", "9.8s", "10s", "59s", "1m12s", "1h00m", "1h02m"]


def test_a_terminal_gets_the_rich_bar_and_no_plain_lines():
    out = Terminal()
    with Progress("sft", 3, "batch", description="SFT warm start", stream=out, every=0) as bar:
        for _ in range(3):
            bar.advance(loss=0.5)
    assert "SFT warm start" in out.getvalue()  # the bar drew
    assert "[sft]" not in out.getvalue() and "elapsed" not in out.getvalue()


def test_disabled_prints_nothing():
    for out in (io.StringIO(), Terminal()):
        with Progress("sft", 2, "batch", stream=out, enabled=False) as bar:
            bar.advance()
            bar.advance()
        assert out.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("STEPOPSD_PROGRESS_EVERY", raising=False)
    assert every_s() == 30
    monkeypatch.setenv("STEPOPSD_PROGRESS_EVERY", "0")
    out = io.StringIO()
    with Progress("demos", 3, "episode", stream=out, clock=Clock()) as bar:
        for _ in range(3):
            bar.advance()
    assert len(out.getvalue().splitlines()) == 3
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("STEPOPSD_PROGRESS_EVERY", bad)
        with pytest.raises(UserError, match="STEPOPSD_PROGRESS_EVERY"):
            every_s()


def test_training_lines_count_steps_without_validation_and_give_an_eta():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgressBar(stream=out, clock=clock)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=4, progress_bar_metrics={"success/rate": 0.25})
    bar.on_fit_start(trainer, None)
    clock.now = 2.0  # the first rollout, then the validation at the start (5 s), then the update
    bar.validation_start(0, {"valid_seen": 16}, 4)
    clock.now = 7.0
    bar.validation_end(0, ["valid_seen success 0.172 (11/64)"])
    clock.now = 10.0
    bar.on_train_batch_end(trainer, None, None, None, 0)
    trainer.current_epoch, clock.now = 1, 16.0
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert out.getvalue().splitlines() == [
        "[validation] step 0 · valid_seen 16 tasks x 4 samples",
        "[validation] step 0 · 5.0s · valid_seen success 0.172 (11/64)",
        "[train] step 1/4 · 25 % · 5.0s · success/rate 0.250 · ETA 15s",  # 10 s less 5 s of validation
        "[train] step 2/4 · 50 % · 6.0s · success/rate 0.250 · ETA 11s",  # mean 5.5 s x 2 steps left
    ]
    bar.disable()  # ranks other than 0
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert len(out.getvalue().splitlines()) == 4


def test_auto_is_rich_on_a_terminal_and_plain_lines_otherwise(monkeypatch):
    monkeypatch.setattr("sys.stdout", Terminal())
    assert type(progress_bar("auto")).__name__ == "RichProgressBar"
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert type(progress_bar("auto")) is PlainProgressBar
    assert type(progress_bar("tqdm")).__name__ == "TQDMProgressBar"


class TerminalFile(io.TextIOWrapper):
    def isatty(self):
        return True


def test_setup_console_makes_stdout_line_buffered_in_batch_logs_only(monkeypatch):
    for stream, buffered in ((io.TextIOWrapper(io.BytesIO()), True), (TerminalFile(io.BytesIO()), False)):
        monkeypatch.setattr("sys.stdout", stream)
        setup_console()
        assert stream.line_buffering is buffered


def test_setup_console_drops_lightnings_own_console_handlers_only_under_a_configured_root(monkeypatch):
    import lightning  # noqa: F401  adds its console handler to the `lightning` logger

    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(io.BytesIO()))

    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    loggers, root = [logging.getLogger(n) for n in names], logging.getLogger()
    saved = [(lg.handlers, lg.propagate) for lg in loggers], root.handlers
    consoles = [logging.StreamHandler(io.StringIO()) for _ in names]
    try:
        for lg, console in zip(loggers, consoles):
            lg.handlers = [console]
        loggers[1].propagate = False  # as lightning.pytorch does when imported before the root had handlers
        root.handlers = []  # no Hydra job logging: Lightning keeps its own
        setup_console()
        assert [lg.handlers for lg in loggers] == [[c] for c in consoles]
        hydra_console = io.StringIO()
        root.handlers = [logging.StreamHandler(hydra_console)]
        setup_console()
        assert all(lg.handlers == [] and lg.propagate for lg in loggers)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        assert hydra_console.getvalue() == "GPU available: False, used: False\n"
        assert all(c.stream.getvalue() == "" for c in consoles)
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved[0]):
            lg.handlers, lg.propagate = handlers, propagate
        root.handlers = saved[1]


def test_the_progress_bar_knob_is_checked_before_any_work():
    from helpers.configs import cfg_of

    from stepopsd.config import ConfigError, check_config

    assert cfg_of("experiment=alfworld_heat", "machine=cpu").callbacks.progress_bar == "auto"
    for kind in ("auto", "rich", "tqdm", "plain"):
        check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", f"callbacks.progress_bar={kind}"))
    with pytest.raises(ConfigError, match="callbacks.progress_bar=fancy: use one of auto, rich, tqdm, plain"):
        check_config(cfg_of("experiment=alfworld_heat", "machine=cpu", "callbacks.progress_bar=fancy"))
