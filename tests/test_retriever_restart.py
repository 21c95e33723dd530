"""A retriever process killed (SIGKILL) mid-episode: SearchEnv fails only the searching slots when nobody
can bring it back, and a run-owned LocalRetrieverServer is started again on its port."""
import os
import signal

import pytest

from stepopsd.envs.search.env import SearchEnv
from stepopsd.envs.search.retrieval import LocalRetrieverServer, RetrieverClient, RetrieverUnavailable
from stepopsd.types import Task

from helpers.search_corpus import write_corpus

TASKS = [Task("t/0", "gen", "q.parquet", "test", True, "Who designed the Zorblat tower clock?", ("Ossa Brell",)),
         Task("t/1", "gen", "q.parquet", "test", True, "What is Vellow known for?", ("its copper lighthouse",))]
SEARCH = {0: "<search>Zorblat tower clock</search>", 1: "<search>tinker clockmaker</search>",
          2: "<search>Vellow copper lighthouse</search>", 3: "<search>Vellow fishing port</search>"}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "wiki-18.jsonl")


def _kill(srv):
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(timeout=10)
    assert srv.proc.returncode == -signal.SIGKILL


def test_killed_server_fails_searching_slots_only(corpus):
    with LocalRetrieverServer(corpus, startup_timeout=60) as srv:
        env = SearchEnv(RetrieverClient(srv.url, timeout=2, retries=1, backoff=0.05))  # a server the run does not own
        env.reset(TASKS, 2)
        first = env.step(SEARCH)
        assert not any(t.state.failed for t in first.values()) and "Ossa Brell" in first[0].state.observation
        _kill(srv)
        second = env.step({0: "<search>who built the clock</search>", 1: "<answer>Ossa Brell</answer>",
                           2: "<search>lighthouse</search>", 3: "no action at all"})
    for slot in (0, 2):
        state = second[slot].state
        assert state.failed and state.done and "unavailable after 2 attempts (connection refused" in state.error
        assert "stepopsd-retriever --corpus" in state.error and "\n" not in state.error
    assert second[1].state.won and not second[1].state.failed
    assert not second[3].valid and not second[3].state.failed and not second[3].state.done
    assert env.num_failures == 2 and env.live_slots() == [3]


def test_owned_server_killed_mid_episode_is_restarted_on_its_port(corpus):
    with LocalRetrieverServer(corpus, startup_timeout=60) as srv:
        env = SearchEnv(srv.client(timeout=2, retries=1, backoff=0.05))
        env.reset(TASKS, 2)
        env.step(SEARCH)
        url, first_pid = srv.url, srv.proc.pid
        _kill(srv)
        second = env.step(SEARCH)
        assert not any(t.state.failed for t in second.values()) and env.num_failures == 0
        assert "copper lighthouse" in second[2].state.observation
        assert srv.restarts == 1 and srv.url == url and srv.proc.pid != first_pid and srv.proc.poll() is None
        assert srv.ensure_alive() is False  # alive: nothing to do
        log = srv.log_path
    assert srv.proc.returncode == 0 and not os.path.exists(log)


def test_restarts_are_bounded(corpus):
    with LocalRetrieverServer(corpus, startup_timeout=60, max_restarts=0) as srv:
        client = srv.client(timeout=2, retries=0)
        _kill(srv)
        with pytest.raises(RetrieverUnavailable) as e:
            client.search(["Pellumy tiles"])
    msg = str(e.value)
    assert "could not be restarted: the run's retriever died (exit code -9) after 0 restarts" in msg and "\n" not in msg
    assert srv.ensure_alive() is False  # after the with block: never started again
