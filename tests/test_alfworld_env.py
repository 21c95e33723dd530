"""The batched ALFWorld environment on the real engine, and the demonstration export."""
import glob
import json
import os
import signal

import pytest

from stepopsd.envs.alfworld.demos import DemoOptions, export_demos, main as demos_main
from stepopsd.envs.alfworld.env import INVALID_OBSERVATION, AlfWorldEnv, load_tasks
from stepopsd.envs.alfworld.expert import play_experts
from stepopsd.envs.alfworld.prompts import format_response, parse_action
from stepopsd.sft import TinySFTConfig


def act(command):
    return format_response("thinking", command)


@pytest.fixture(scope="module")
def tasks(generated_games):
    out, _ = generated_games
    return load_tasks(str(out), "train")


def test_group_members_start_from_the_same_state(tasks):
    with AlfWorldEnv(num_workers=2) as env:
        states = env.reset(tasks[:2], group_size=3)
        assert len(states) == 6 and not any(s.failed or s.done for s in states)
        for g in range(2):
            group = states[3 * g:3 * g + 3]
            assert len({(s.goal, s.observation, s.admissible) for s in group}) == 1
        assert states[0].goal != states[3].goal
        assert "help" not in states[0].admissible and states[0].steps == 0
        assert env.data_label == "generated"


def test_group_of_different_games_is_refused(tasks, monkeypatch):
    with AlfWorldEnv(num_workers=0) as env:
        real_reset = env.pool.reset
        # one member of the group loads another game: a group that is not G copies of one state
        monkeypatch.setattr(env.pool, "reset", lambda sources: real_reset([sources[0], tasks[1].source]))
        with pytest.raises(RuntimeError, match="different states"):
            env.reset(tasks[:1], group_size=2)


def test_protocol_valid_invalid_win_and_step_limit(tasks):
    heat = next(t for t in tasks if t.task_type == "heat")
    (episode,) = play_experts([(heat.source, {})], workers=1)
    plan = episode.steps
    assert episode.won
    with AlfWorldEnv(num_workers=0, max_steps=len(plan) + 2) as env:
        env.reset([heat], group_size=3)
        # slot 0 follows the expert plan, slot 1 writes no action block, slot 2 writes an inadmissible command
        for k, step in enumerate(plan):
            out = env.step({0: act(step.action), 1: "i am not sure what to do", 2: act("fly to the moon")})
            assert out[1].valid is False and out[1].action is None and out[1].reward == pytest.approx(-0.1)
            assert out[1].state.observation == INVALID_OBSERVATION and out[1].state.steps == k + 1
            assert out[2].valid and out[2].action == "fly to the moon" and out[2].reward == 0.0
            assert out[2].state.observation == "Nothing happens."
        assert out[0].state.won and out[0].state.done and out[0].reward == 10.0
        assert env.live_slots() == [1, 2]
        with pytest.raises(ValueError, match="not live"):
            env.step({0: act("look")})
        out = env.step({1: act("look"), 2: act("look")})
        assert not out[1].state.done and out[1].reward == 0.0
        out = env.step({1: act("look"), 2: "<action></action>"})
        assert out[1].state.done and out[2].state.done and not out[1].state.won
        assert out[2].state.steps == len(plan) + 2 and out[2].reward == pytest.approx(-0.1)
        assert env.live_slots() == []


def test_a_crashed_worker_fails_only_its_trajectories(tasks):
    with AlfWorldEnv(num_workers=2) as env:
        states = env.reset(tasks[:2], group_size=2)  # slots 0, 2 on worker 0; 1, 3 on worker 1
        os.kill(env.pool.worker_pids[1], signal.SIGKILL)
        out = env.step({i: act(states[i].admissible[0]) for i in range(4)})
        assert [out[i].state.failed for i in range(4)] == [False, True, False, True]
        assert "crashed" in out[1].state.error and out[1].state.done
        assert env.live_slots() == [0, 2] and env.num_failures == 2
        out = env.step({0: act("look"), 2: act("look")})
        assert not out[0].state.failed and not out[2].state.failed
        states = env.reset(tasks[:2], group_size=2)  # the replaced worker serves again
        assert not any(s.failed for s in states)


def test_demonstrations_export(tasks, tmp_path):
    out = tmp_path / "demos.jsonl"
    counts = export_demos(tasks, str(out), DemoOptions(epsilon=0.3, seed=1, compact=True), workers=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["records"] == len(records) > 0 and counts["data"] == "generated"
    assert {r["task_type"] for r in records} <= {t.task_type for t in tasks}
    for r in records:
        action, valid = parse_action(r["response"], require_think=True)
        assert valid and r["is_expert"] and r["data"] == "generated" and r["won"]
        assert action in r["prompt"] and "\ntask: " in r["prompt"]
    # with epsilon > 0 some random detours were taken: they show in later prompts' history but not as targets
    steps_per_task = {}
    for r in records:
        steps_per_task.setdefault(r["task_id"], []).append(r["step"])
    assert any(steps != list(range(len(steps))) for steps in steps_per_task.values())
    assert demos_main(["--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert out.exists()  # a failed export leaves the earlier file alone


def test_repeat_detours_show_recovery_from_nothing_happens(tasks, tmp_path):
    """demo repeat: the last command again when it is no longer admissible; the engine answers
    "Nothing happens." and the expert's next step (a target) starts from that observation."""
    jobs = [(t.source, {"seed": i, "repeat": 0.5}) for i, t in enumerate(tasks)]
    episodes = play_experts(jobs, workers=2)
    assert all(e.won for e in episodes)
    repeats = 0
    for ep in episodes:
        for before, step, after in zip(ep.steps, ep.steps[1:], ep.steps[2:]):
            if not step.is_expert:
                assert step.action == before.action and step.action not in step.admissible
                assert after.observation == INVALID_OBSERVATION
                repeats += 1
    assert repeats >= len(tasks)  # at 0.5 most episodes repeat several times
    out = tmp_path / "demos.jsonl"
    export_demos(tasks, str(out), DemoOptions(repeat=0.5, compact=True), workers=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    now = f"\nobs: {INVALID_OBSERVATION}\nactions:"
    recovering = [r for r in records if now in r["prompt"]]
    assert recovering and all(r["is_expert"] for r in recovering)
    for r in recovering:  # the target after a repeat is not the repeated command
        last = r["prompt"].split(now)[0].rsplit("| act: ", 1)[1]
        assert parse_action(r["response"])[0] != last
    with pytest.raises(ValueError, match="repeat"):
        DemoOptions(repeat=1.0)
    assert TinySFTConfig(data="g", demo_repeat=0.3).key() != TinySFTConfig(data="g").key()  # another cached policy


def test_prompts_carry_history_and_targets_cover_the_action_block(tasks):
    with AlfWorldEnv(num_workers=0, compact=True, history_length=2) as env:
        states = env.reset(tasks[:1], group_size=1)
        first = env.prompt(0)
        assert f"\ntask: {states[0].goal}\n" in first and first.startswith("step: 0") and "obs: " in first
        cmds = states[0].admissible
        env.step({0: act(cmds[0])})
        env.step({0: "no action here"})
        env.step({0: act("look")})
        prompt = env.prompt(0)
        assert "step: 3" in prompt and f"act: {cmds[0]}" not in prompt  # only the last two pairs are shown
        assert "act: (no valid action)" in prompt and "act: look" in prompt
    response = "<think>go</think> <action> Look </action> trailing"
    start, end = env.target_chars(response, "action_only")
    assert response[start:end] == "<action> Look </action>"
    assert env.target_chars(response, "full_step") == (0, len(response))
    assert env.target_chars("<think>x</think>", "action_only") is None
    assert env.target_chars("<think>x</think>", "full_step") is None
    with pytest.raises(ValueError, match="does not apply to ALFWorld"):
        env.target_chars(response, "clean_step_no_observation")


PLAY_RANDOM = """
import glob, json, random, sys
from stepopsd.envs.alfworld.engine import AlfWorldEngine
import textworld.envs.pddl.textgen as textgen
rng, engine, seen = random.Random(0), AlfWorldEngine(), []
games = sorted(glob.glob(sys.argv[1] + "/**/game.tw-pddl", recursive=True))
for game in games + games[:2]:  # the last two reset a game already translated (the pddl2sas cache)
    state = engine.reset(game)
    seen.append(state)
    for _ in range(12):
        state = engine.step(rng.choice(sorted(state["admissible"])))
        seen.append(state)
import fast_downward
import textworld.envs.pddl.logic as pddl_logic
from textworld.logic import Rule
cached = [getattr(f, "stepopsd_cached", False) for f in (
    textgen._parse_and_convert, pddl_logic._parse_and_convert, fast_downward.pddl2sas, Rule.parse_conjunctive_query)]
print(json.dumps({"cached": cached, "translations": getattr(fast_downward.pddl2sas, "translations", None), "seen": seen}))
"""


def test_engine_cache_gives_the_same_text_as_plain_textworld(generated_games, tmp_path):
    """Random commands on every generated game, with and without the engine caches: same observations,
    admissible commands and win flags (run in fresh processes, since the patch is process-wide). The first
    cached run translates every game and keeps the translations on disk; the second reads them all."""
    import subprocess
    import sys

    runs = []
    games = len(glob.glob(str(generated_games[0] / "**" / "game.tw-pddl"), recursive=True))
    for plain in ("", "", "1"):
        env = dict(os.environ, STEPOPSD_PLAIN_TEXTWORLD=plain, STEPOPSD_TRANSLATIONS=str(tmp_path / "translations"))
        proc = subprocess.run([sys.executable, "-c", PLAY_RANDOM, str(generated_games[0])], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["cached"] == runs[1]["cached"] == [True] * 4 and runs[2]["cached"] == [False] * 4
    assert runs[0]["translations"] == 2 * games and runs[1]["translations"] == 0  # plain + optimised, once
    assert len(os.listdir(tmp_path / "translations")) == 2 * games
    assert len(runs[0]["seen"]) >= 12 * 13
    assert runs[0]["seen"] == runs[1]["seen"] == runs[2]["seen"]


def test_the_in_memory_translations_are_bounded(monkeypatch):
    """A worker meets thousands of games over a run: only the `keep` most recently used translations stay in
    memory (each ~1.2 MB); an evicted one is translated again (or read from disk, off here)."""
    from stepopsd.envs.alfworld.engine_cache import _translation_cache

    monkeypatch.setenv("STEPOPSD_TRANSLATIONS", "0")  # memory only
    call = _translation_cache(lambda domain, problem: {"sas": f"{domain}/{problem}"}, keep=2)
    for problem in ("a", "b", "a", "c"):  # "a" used again before "c": "b" is the least recent
        assert call("d", problem) == {"sas": f"d/{problem}"}
    assert call.translations == 3
    call("d", "a")
    assert call.translations == 3  # still in memory
    call("d", "b")
    assert call.translations == 4  # evicted, translated again
