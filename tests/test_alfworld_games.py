"""Generated ALFWorld games: layout, determinism, solvability by the package's expert, the loader."""
import json
import os
import shutil

import pytest

from conftest import GAMES_ARGS
from stepopsd.envs.alfworld import scenes
from stepopsd.envs.alfworld.env import DataNotFoundError, load_tasks
from stepopsd.envs.alfworld.expert import play_expert, play_experts
from stepopsd.envs.alfworld.generate import main as make_games_main, make_games, sample_game
from stepopsd.envs.alfworld.tasks import GENERATED_KEY, SPLITS, TASK_TYPES


def _tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_all_six_types_in_all_three_splits_in_official_layout(generated_games):
    out, report = generated_games
    for split in SPLITS:
        folders = os.listdir(out / "json_2.1.1" / split)
        assert sorted(f.split("-")[0] for f in folders) == sorted(TASK_TYPES.values())
        for folder in folders:
            prefix, obj, mrecep, recep, scene = folder.split("-")
            assert mrecep == "None" and obj and recep and scene.isdigit()
            (trial,) = os.listdir(out / "json_2.1.1" / split / folder)
            files = sorted(os.listdir(out / "json_2.1.1" / split / folder / trial))
            assert files == ["game.tw-pddl", "traj_data.json"]
            game = json.loads((out / "json_2.1.1" / split / folder / trial / "game.tw-pddl").read_text())
            assert set(game) == {"pddl_domain", "grammar", "pddl_problem", "solvable"} and game["solvable"]
            assert "UNKNOWN GOAL" not in game["grammar"]
            traj = json.loads((out / "json_2.1.1" / split / folder / trial / "traj_data.json").read_text())
            assert traj["task_type"] == prefix and traj[GENERATED_KEY]["seed"] == 0
            assert traj["turk_annotations"]["anns"][0]["task_desc"]
            plan = int(scene)
            if split == "valid_unseen":
                assert plan in scenes.UNSEEN_FLOOR_PLANS
            else:
                assert plan not in scenes.UNSEEN_FLOOR_PLANS
    assert report.data_label == "generated"
    assert all(5 <= n <= 30 for lengths in report.plan_lengths.values() for n in lengths)
    assert "[generated]" in report.table()


def test_generator_is_deterministic(generated_games, tmp_path):
    out, _ = generated_games
    make_games(str(tmp_path), log=lambda *_: None, **GAMES_ARGS)
    first, second = _tree(out), _tree(tmp_path)
    assert first.keys() == second.keys() and first == second


def test_different_seed_gives_different_games():
    a = sample_game("train", "heat", 0, 0)
    assert a == sample_game("train", "heat", 0, 0)
    assert a != sample_game("train", "heat", 1, 0)


def test_valid_seen_uses_train_layouts_with_new_placements():
    seen = {sample_game("valid_seen", "pick", 0, k).floor_plan for k in range(30)}
    assert seen <= set(scenes.split_floor_plans("train")) and not seen & set(scenes.UNSEEN_FLOOR_PLANS)
    assert sample_game("valid_seen", "pick", 0, 0).placements != sample_game("train", "pick", 0, 0).placements


def test_every_type_is_solved_by_the_package_expert(generated_games):
    out, _ = generated_games
    tasks = load_tasks(str(out), "train") + load_tasks(str(out), "valid_unseen")
    episodes = play_experts([(t.source, {"max_steps": 50, "seed": 7}) for t in tasks], workers=2)
    assert sorted(t.task_type for t, ep in zip(tasks, episodes) if ep.won) == sorted(2 * list(TASK_TYPES))
    # the planner expert (full state, optimal plan) agrees on a sample and needs no more steps
    pick = next(i for i, t in enumerate(tasks) if t.task_type == "pick")
    planned = play_expert(tasks[pick].source, expert="planner")
    assert planned.won and len(planned.steps) <= len(episodes[pick].steps)


def test_loader_reads_generated_games_as_official_data(generated_games, tmp_path, monkeypatch):
    out, _ = generated_games
    generated = load_tasks(str(out), "valid_seen")
    assert len(generated) == 6 and all(t.generated and t.data_label == "generated" for t in generated)
    # the same files without the marker are what an official download looks like
    official = tmp_path / "official"
    shutil.copytree(out / "json_2.1.1" / "valid_seen", official / "json_2.1.1" / "valid_seen")
    for t in generated:
        p = official / "json_2.1.1" / t.task_id / "traj_data.json"
        traj = json.loads(p.read_text())
        del traj[GENERATED_KEY]
        p.write_text(json.dumps(traj))
    monkeypatch.setenv("ALFWORLD_DATA", str(official))
    loaded = load_tasks(None, "valid_seen")
    assert [(t.task_id, t.task_type) for t in loaded] == [(t.task_id, t.task_type) for t in generated]
    assert not any(t.generated for t in loaded) and loaded[0].data_label == "official"
    # the json_2.1.1 folder itself is accepted too; task-type filters use the short names
    heat = load_tasks(str(official / "json_2.1.1"), "valid_seen", ["heat"])
    assert [t.task_type for t in heat] == ["heat"] and "pick_heat_then_place_in_recep" in heat[0].task_id


def test_loader_skips_unsolvable_games(generated_games, tmp_path):
    out, _ = generated_games
    shutil.copytree(out / "json_2.1.1", tmp_path / "json_2.1.1")
    (task,) = load_tasks(str(tmp_path), "train", ["cool"])
    game = json.loads(open(task.source).read())
    game["solvable"] = False
    open(task.source, "w").write(json.dumps(game))
    assert [t.task_type for t in load_tasks(str(tmp_path), "train", ["cool", "heat"])] == ["heat"]


def test_missing_or_empty_data_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="ALFWORLD_DATA") as e:
        load_tasks(None, "train")
    assert "\n" not in str(e.value) and "stepopsd-make-games" in str(e.value)
    with pytest.raises(DataNotFoundError) as e:
        load_tasks(str(tmp_path / "nowhere"), "valid_unseen")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere" / "json_2.1.1" / "valid_unseen") in msg
    assert "alfworld-download" in msg and "stepopsd-make-games" in msg
    with pytest.raises(ValueError, match="unknown ALFWorld task type"):
        load_tasks(str(tmp_path), "train", ["boil"])


def test_make_games_cli_rejects_bad_options(tmp_path, capsys):
    assert make_games_main(["--out", str(tmp_path), "--task-types", "boil"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown ALFWorld task type" in err
    assert make_games_main(["--out", str(tmp_path), "--min-plan", "9", "--max-plan", "3"]) == 2
    assert not os.path.exists(tmp_path / "json_2.1.1")
