"""Environment specs (stepopsd/envs/registry.py): both environments registered and found by discovery, an unknown
`env.name` one line listing them, each spec's pieces on small generated data, and no branch on an environment's
name left outside stepopsd/envs/."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from stepopsd.envs import EnvSpec, UnknownEnvError, env_names, get_env, register_env
from stepopsd.errors import UserError
from stepopsd.types import Transition

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_environments_are_registered():
    assert env_names() == ["alfworld", "credit", "search"]
    for name in env_names():
        spec = get_env(name)
        assert isinstance(spec, EnvSpec) and spec.name == name
        assert type(spec).__module__ == f"stepopsd.envs.{name}.spec"


def test_unknown_env_is_one_line_listing_the_registered():
    with pytest.raises(UnknownEnvError) as err:
        get_env("gridworld")
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert "env.name=gridworld" in message and "alfworld, credit, search" in message


def test_a_second_spec_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        @register_env("search")
        class Other(EnvSpec):
            pass
    assert type(get_env("search")).__name__ == "SearchSpec"


def test_unknown_env_name_in_a_run_config_is_a_config_error():
    from stepopsd.config import ConfigError, env_spec

    with pytest.raises(ConfigError, match="registered: alfworld, credit, search"):
        env_spec(OmegaConf.create({"env": {"name": "gridworld"}}))


def test_envs_know_nothing_of_learning():
    """Importing every environment spec imports no learning module."""
    code = ("import sys; from stepopsd.envs import env_names; env_names(); "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['stepopsd', 'module'], ['stepopsd', 'estimators'], "
            "['stepopsd', 'callbacks'], ['stepopsd', 'train'], ['stepopsd', 'hindsight'], ['stepopsd', 'teacher'])]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _alfworld_cfg(path, **data):
    return OmegaConf.create({
        "env": {"name": "alfworld", "num_workers": 1, "max_steps": 5, "history_length": 2, "compact": True,
                "require_think": False, "step_timeout": 60},
        "data": {"path": str(path), "train_split": "train", "task_types": ["pick"],
                 "generate": {"seed": 0, "train_per_type": 2, "valid_per_type": 1}} | data})


def test_alfworld_spec_checks():
    spec = get_env("alfworld")
    spec.check(_alfworld_cfg("x"))  # no knobs of its own
    spec.check_splits(["valid_seen", "valid_unseen"], "data.val_splits")
    with pytest.raises(ValueError, match="data.val_splits: unknown ALFWorld split 'valid_x'"):
        spec.check_splits(["valid_seen", "valid_x"], "data.val_splits")
    spec.check_task_types(["pick", "heat"], "data.task_types")
    with pytest.raises(ValueError, match="^data.task_types: .*'boil'"):
        spec.check_task_types(["boil"], "data.task_types")
    assert spec.corpus(_alfworld_cfg("x"), "x") is None
    with spec.services(_alfworld_cfg("x"), "x") as service:
        assert service is None


def test_alfworld_spec_data_and_env(tmp_path):
    spec = get_env("alfworld")
    cfg = _alfworld_cfg(tmp_path / "games")
    data = spec.prepare_data(cfg)
    assert data == str(tmp_path / "games") and (tmp_path / "games" / "json_2.1.1" / "train").is_dir()
    assert spec.prepare_data(cfg) == data  # present: not generated again
    train = spec.load_split(cfg, data, "train", ["pick"])
    assert len(train) == 2 and {t.task_type for t in train} == {"pick"}
    assert len(spec.load_split(cfg, data, "train", ["pick"], limit=1)) == 1
    make = spec.env_factory(cfg)
    assert make.func.__name__ == "AlfWorldEnv" and make.args == (1,) and make.keywords["max_steps"] == 5


def _step(action: str, valid: bool):
    return SimpleNamespace(transition=Transition(f"<action>{action}</action>", action if valid else None, valid, 0.0))


def test_alfworld_peer_lines_number_the_valid_actions():
    peer = SimpleNamespace(steps=[_step("go to desk 1", True), _step("dance", False), _step("take pen 1", True)])
    assert get_env("alfworld").peer_lines(peer) == ["1. go to desk 1", "3. take pen 1"]
    from stepopsd.hindsight import alfworld_peer_lines  # the teacher's default: the same lines

    assert alfworld_peer_lines(peer) == get_env("alfworld").peer_lines(peer)


def _search_cfg(path, **retriever):
    return OmegaConf.create({
        "env": {"name": "search", "max_steps": 4, "history_length": 4, "topk": 3, "compact": True,
                "require_think": False, "invalid_penalty": 0.01,
                "retriever": {"url": "http://127.0.0.1:9/retrieve", "start_server": False, "corpus": None,
                              "timeout": 1, "retries": 0} | retriever},
        "data": {"path": str(path), "train_split": "train", "task_types": ["all"],
                 "generate": {"seed": 0, "entities": 40, "train": 6, "test": 3}}})


def test_search_spec_checks():
    spec = get_env("search")
    spec.check(_search_cfg("x"))
    bad = _search_cfg("x")
    bad.env.topk = 0
    with pytest.raises(ValueError, match="env.topk=0"):
        spec.check(bad)
    with pytest.raises(ValueError, match="env.retriever.url is empty"):
        spec.check(_search_cfg("x", url=""))
    spec.check(_search_cfg("x", url="", start_server=True))
    spec.check_splits(["test", "anything"], "data.val_splits")  # parquet names: found when loaded
    assert spec.corpus(_search_cfg("x"), "q") == os.path.join("q", "corpus.jsonl")
    assert spec.corpus(_search_cfg("x", corpus="c.jsonl"), "q") == "c.jsonl"
    with spec.services(_search_cfg("x"), "q") as service:
        assert service == "http://127.0.0.1:9/retrieve"  # a running retriever: its URL, nothing started


def test_search_spec_data_and_env(tmp_path):
    spec = get_env("search")
    cfg = _search_cfg(tmp_path / "qa")
    data = spec.prepare_data(cfg)
    assert (tmp_path / "qa" / "train.parquet").is_file() and (tmp_path / "qa" / "corpus.jsonl").is_file()
    assert len(spec.load_split(cfg, data, "train", ["all"])) == 6
    assert len(spec.load_split(cfg, data, "test", ["all"], limit=1)) == 2  # the first of each data source
    make = spec.env_factory(cfg, "http://127.0.0.1:9/retrieve")
    assert make.func.__name__ == "SearchEnv" and make.keywords["topk"] == 3


def test_search_peer_lines_drop_information():
    step = SimpleNamespace(response="<think>a</think><search>q</search>\n<information>x</information>")
    assert get_env("search").peer_lines(SimpleNamespace(steps=[step])) == ["<think>a</think><search>q</search>"]


def test_tiny_sft_config_asks_the_spec():
    from stepopsd.sft import TinySFTConfig

    with pytest.raises(ValueError, match="must be alfworld or credit or search"):
        TinySFTConfig(data="g", env="gridworld")
    with pytest.raises(ValueError, match="needs a corpus"):
        TinySFTConfig(data="q", env="search")
    TinySFTConfig(data="q", env="search", corpus="q/corpus.jsonl")


def test_alfworld_demonstrations(tmp_path):
    from stepopsd.sft import TinySFTConfig, demonstrations

    spec = get_env("alfworld")
    data = spec.prepare_data(_alfworld_cfg(tmp_path / "games"))
    sft = TinySFTConfig(data=data, task_types=("pick",), compact=True)
    logged = []
    records, texts, label = demonstrations(sft, str(tmp_path / "demos.jsonl"), 1, logged.append)
    assert records and {"prompt", "response"} <= set(records[0]) and label == "generated"
    assert (tmp_path / "demos.jsonl").is_file() and "2 games x 1 episodes" in logged[0]
    assert "<hindsight>" in texts[-1] and "take apple 1 from countertop 1" in texts[-1]


# --- no branch on an environment's name outside stepopsd/envs/ -----------------------------------------------

def _names_an_env(node: ast.AST, names: set[str]) -> bool:
    """A literal naming a registered environment: "search", or a tuple/list/set holding one."""
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
    return False


def env_name_branches(source: str, names: set[str]) -> list[int]:
    """Lines comparing something with an environment's name (`cfg.env.name == "search"`, `env in ("alfworld", ...)`)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Compare) and any(_names_an_env(n, names) for n in [node.left, *node.comparators])]


def test_the_branch_finder_finds_branches():
    names = {"alfworld", "search"}
    assert env_name_branches('if cfg.env.name == "search":\n    pass\n', names) == [1]
    assert env_name_branches('x = 1\nok = env not in ("alfworld", "search")\n', names) == [2]
    assert env_name_branches('if get_env(cfg.env.name).corpus(cfg, d):\n    pass\nif tag == "answer": pass\n', names) == []


def test_no_env_name_branch_outside_envs():
    names = set(env_names())
    files = [p for p in (ROOT / "stepopsd").rglob("*.py") if "envs" not in p.relative_to(ROOT / "stepopsd").parts[:1]]
    files += list(ROOT.glob("*.py")) + [p for p in (ROOT / "experiments").rglob("*.py")  # not the ignored scratch
                                        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    found = [f"{p.relative_to(ROOT)}:{line}" for p in sorted(files)
             for line in env_name_branches(p.read_text(), names)]
    assert len(files) > 20 and not found, f"branches on env.name outside stepopsd/envs/ (use its EnvSpec): {found}"
