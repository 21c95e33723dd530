"""Bad input of every kind is one line that says what is wrong and how to fix it, before any expensive work.

Configs, data, models and tokenizers, checkpoints: each case runs `train()` (or the real `train.py` for what
Hydra itself rejects) on the tiny CPU configuration and expects a `UserError` whose message is one line and
names the culprit. A few go through the entry point to check what the user sees: `train.py: error: ...`,
exit status 2, no traceback. The retriever's own probes are tested against real servers in test_retriever_check.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stepopsd.errors import UserError, one_line

from helpers.configs import cfg_of
from helpers.runs import ROOT, run_train, tiny_overrides


@pytest.fixture(scope="module")
def games(generated_games):
    return str(generated_games[0])


@pytest.fixture(scope="module")
def tiny_run(games, tmp_path_factory):
    """A real 1-step stepopsd run: its checkpoint and saved policy are the raw material of the bad files."""
    cache, out = tmp_path_factory.getbasetemp() / "tiny-cache", tmp_path_factory.mktemp("tiny-run")
    proc = run_train("experiment=alfworld_heat", "machine=cpu", *tiny_overrides(games, cache, out), "training_steps=1",
                     "val_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def other_api(tmp_path_factory):
    """A real HTTP server that is not a retriever (it serves files, and 501 on POST)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path_factory.mktemp("www")))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def bad(games, tiny_run, other_api, tmp_path_factory):
    """Broken copies of real inputs, by name."""
    import socket

    root = tmp_path_factory.mktemp("bad")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    paths = {"empty": root / "empty", "missing": root / "no" / "such", "other_api": other_api, "free_port": free_port}
    paths["empty"].mkdir()
    for name in ("corrupt_game", "no_task_type", "other_task_type"):
        shutil.copytree(games, root / name)
        paths[name] = root / name
    game = sorted((paths["corrupt_game"] / "json_2.1.1" / "train").glob("pick_heat*/*/game.tw-pddl"))[0]
    game.write_text(game.read_text()[:300])  # a truncated download
    for name, value in (("no_task_type", None), ("other_task_type", "pick_and_place_simple")):
        traj = sorted((paths[name] / "json_2.1.1" / "train").glob("pick_heat*/*/traj_data.json"))[0]
        data = json.loads(traj.read_text())
        data.pop("task_type") if value is None else data.update(task_type=value)
        traj.write_text(json.dumps(data))
    qa = root / "qa"
    qa.mkdir()
    pq.write_table(pa.table({"question": ["who?"], "data_source": ["nq"]}), qa / "train.parquet")  # no answers
    (qa / "test.parquet").write_text("not parquet")
    paths["qa"] = qa
    (root / "corpus.jsonl").write_text('{"id": "1", "contents": "\\"A\\"\\ntext"}\n{"title": "no id"}\n')
    paths["corpus"] = root / "corpus.jsonl"
    from stepopsd.envs.search.generate import make_qa

    make_qa(str(root / "qa_good"), 0, num_entities=40, train_questions=8, test_questions=4)
    paths["qa_good"] = root / "qa_good"
    # models and tokenizers, from the run's saved policy
    policy = tiny_run / "policy"
    for name in ("no_tokenizer", "no_eos", "no_chat_template"):
        shutil.copytree(policy, root / name)
        paths[name] = root / name
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        os.remove(paths["no_tokenizer"] / f)
    config = json.loads((paths["no_eos"] / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (paths["no_eos"] / "tokenizer_config.json").write_text(json.dumps(config))
    os.remove(paths["no_chat_template"] / "chat_template.jinja")
    # checkpoints
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    paths["ckpt"] = ckpt
    paths["truncated_ckpt"] = root / "truncated.ckpt"
    paths["truncated_ckpt"].write_bytes(ckpt.read_bytes()[:50_000])
    paths["tensor_file"] = root / "tensor.ckpt"
    torch.save(torch.zeros(3), paths["tensor_file"])
    paths["foreign_ckpt"] = root / "foreign" / "checkpoints" / "last.ckpt"  # no .hydra: the weights are compared
    paths["foreign_ckpt"].parent.mkdir(parents=True)
    shutil.copy(ckpt, paths["foreign_ckpt"])
    return paths


def tiny(games, cache, out, *extra):
    """The tiny configuration plus `extra`; another experiment or model in `extra` drops what does not apply."""
    over = [o for o in tiny_overrides(games, cache, out) if not o.startswith("hydra.")]
    experiment = next((o for o in extra if o.startswith("experiment=")), "experiment=alfworld_heat")
    if any(o.startswith("model=") for o in extra):  # a hub model config: no tiny-policy keys, on the CPU
        over = [o for o in over if not o.startswith("model.")] + ["require_gpu=false", "trainer.accelerator=cpu",
                                                                   "trainer.precision=32-true"]
    if experiment != "experiment=alfworld_heat":
        over = [o for o in over if not o.startswith(("data.path", "env.max_steps"))]
    return [experiment, "machine=cpu", *over, f"paths.output_dir={out}", *[o for o in extra if o != experiment]]


CASES = {  # name -> (overrides given `bad` paths, what the one line must name)
    # configs
    "knob out of range": (lambda b: ["algorithm.stepopsd.alpha_clip=1.5"], "alpha_clip"),
    "group of one": (lambda b: ["group_size=1"], "group_size=1"),
    "accelerator without a backend": (lambda b: ["trainer.accelerator=tpu"], "trainer.accelerator=tpu"),
    "devices not a count": (lambda b: ["trainer.devices=abc"], "trainer.devices=abc"),
    "nodes zero": (lambda b: ["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    "gpu without one": (lambda b: ["trainer.accelerator=gpu"], "no CUDA GPU"),
    "unknown task type": (lambda b: ["data.task_types=[boil]"], "'boil'"),
    "unknown split": (lambda b: ["data.val_splits=[valid_unknown]"], "valid_unknown"),
    "resume and ckpt_path": (lambda b: ["resume=auto", f"ckpt_path={b['ckpt']}"], "choose one"),
    "resume of no folder": (lambda b: [f"resume={b['missing']}"], "no such run folder"),
    "unknown objective": (lambda b: ["optimized_metric=val/nope"], "val/nope"),
    "demo repeat not a probability": (lambda b: ["model.sft.demo_repeat=1.5"], "demo_repeat=1.5"),
    "no SFT epochs": (lambda b: ["model.sft.epochs=0"], "model.sft: need epochs >= 1"),
    "unknown SFT knob": (lambda b: ["+model.sft.epoch=3"], "model.sft.epoch: Key 'epoch' not in 'TinySFTKnobs'; the knobs there: epochs, lr,"),
    # data
    "missing data folder": (lambda b: [f"data.path={b['missing']}"], "no ALFWorld games"),
    "empty data folder": (lambda b: [f"data.path={b['empty']}"], "no ALFWorld games"),
    "truncated game file": (lambda b: [f"data.path={b['corrupt_game']}"], "game.tw-pddl is not valid JSON"),
    "traj_data without task_type": (lambda b: [f"data.path={b['no_task_type']}"], "task_type None"),
    "traj_data of another task": (lambda b: [f"data.path={b['other_task_type']}"], "does not match its folder"),
    "parquet without answers": (lambda b: ["experiment=searchqa", f"data.path={b['qa']}"], "golden_answers"),
    "not a parquet": (lambda b: ["experiment=searchqa", f"data.path={b['qa']}", "data.train_split=test"],
                      "not a readable parquet"),
    # retrieval (a URL given, no run-owned server): probed before the policy
    "retriever at a wrong URL": (lambda b: ["experiment=searchqa", f"data.path={b['qa_good']}", "env.retriever.start_server=false",
                                            f"env.retriever.url=http://127.0.0.1:{b['free_port']}/retrieve"],
                                 "stepopsd-retriever --corpus"),
    "retriever of another API": (lambda b: ["experiment=searchqa", f"data.path={b['qa_good']}", "env.retriever.start_server=false",
                                            f"env.retriever.url={b['other_api']}/retrieve"], "retriever"),
    "corpus without ids": (lambda b: ["experiment=searchqa", f"data.path={b['qa_good']}", f"env.retriever.corpus={b['corpus']}"],
                           "not a corpus line"),
    # models and tokenizers
    "missing model folder": (lambda b: ["model=qwen3_1.7b", f"model.name_or_path={b['missing']}"], "no such folder"),
    "folder without a tokenizer": (lambda b: ["model=qwen3_1.7b", f"model.name_or_path={b['no_tokenizer']}"],
                                   "holds no tokenizer"),
    "tokenizer without eos": (lambda b: ["model=qwen3_1.7b", f"model.name_or_path={b['no_eos']}"], "no eos token"),
    "tokenizer without chat template": (lambda b: ["model=qwen3_1.7b", f"model.name_or_path={b['no_chat_template']}"],
                                        "no chat template"),
    "random init, tokenizer folder missing": (lambda b: ["model=qwen3_1.7b", "model.init=random",
                                                         f"model.tokenizer={b['missing']}"], "no such folder"),
    # checkpoints
    "truncated checkpoint": (lambda b: [f"ckpt_path={b['truncated_ckpt']}"], "not a readable checkpoint"),
    "a tensor, not a checkpoint": (lambda b: [f"ckpt_path={b['tensor_file']}"], "not a training checkpoint"),
    "checkpoint of another algorithm": (lambda b: [f"ckpt_path={b['ckpt']}", "algorithm=grpo"], "algorithm.name=stepopsd"),
    "checkpoint of another model": (lambda b: [f"ckpt_path={b['ckpt']}", "model.architecture.hidden_size=64"],
                                    "model.architecture"),
    "checkpoint without its run, another algorithm": (lambda b: [f"ckpt_path={b['foreign_ckpt']}", "algorithm=grpo"],
                                                      "is an algorithm=stepopsd checkpoint"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it(name, bad, games, tmp_path, tmp_path_factory):
    from stepopsd.train import train

    if name == "gpu without one" and torch.cuda.is_available():
        pytest.skip("checks the no-GPU message")
    make, expected = CASES[name]
    cfg = cfg_of(*tiny(games, tmp_path_factory.getbasetemp() / "tiny-cache", tmp_path, *make(bad)))
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    assert not os.path.exists(tmp_path / "checkpoints")  # stopped before training


def test_at_least_twenty_distinct_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("overrides, expected", [
    (["experiment=nope"], "Could not find 'experiment/nope'; Available options in 'experiment': alfworld, alfworld_all,"),
    (["experiment=alfworld_heat", "algorithm=ppo"],  # every config in conf/algorithm/ (one per registered estimator)
     "Available options in 'algorithm': " + ", ".join(sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "algorithm"))))),
    (["experiment=alfworld_heat", "algorithm.ppo.lrr=1"], "Could not override 'algorithm.ppo.lrr'"),
    (["experiment=alfworld_heat", "seed=["], "no viable alternative"),
])
def test_what_hydra_rejects_is_one_line_too(overrides, expected):
    proc = run_train(*overrides, "machine=cpu")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("train.py: error: ") and expected in proc.stderr


def test_a_late_user_error_through_the_entry_point_has_no_traceback(bad, games, tmp_path):
    """The error is raised inside the task function (data loading): still one line, exit 2; with
    STEPOPSD_DEBUG=1 the traceback is there for a bug report."""
    over = tiny(games, tmp_path, tmp_path, f"data.path={bad['corrupt_game']}")
    over = [o for o in over if not o.startswith("paths.output_dir")] + [f"hydra.run.dir={tmp_path}"]
    proc = run_train(*over)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: ") and "not valid JSON" in proc.stderr
    proc = run_train(*over, env={"STEPOPSD_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "BadGameError" in proc.stderr


def test_a_checkpoint_of_another_model_without_its_run_is_one_line(bad):
    """No .hydra next to the checkpoint: the weights themselves are compared once the module exists."""
    from stepopsd.checkpoints import check_compatible, read_checkpoint

    ckpt = read_checkpoint(str(bad["ckpt"]))
    with pytest.raises(UserError, match=r"written for another model: 2 weights missing \(e.g. weight\), \d+ unexpected"):
        check_compatible(ckpt, str(bad["ckpt"]), torch.nn.Linear(2, 2), [])
    key, value = next(iter(ckpt["state_dict"].items()))  # the same name, another shape
    wider = {key: torch.zeros(*value.shape[:-1], value.shape[-1] + 1)}
    with pytest.raises(UserError, match=f"{key} has shape"):
        check_compatible({"state_dict": wider, "callbacks": {}}, "x.ckpt", _Holder(key, value), [])


class _Holder(torch.nn.Module):
    """A module whose state dict is exactly {key: value}."""

    def __init__(self, key, value):
        super().__init__()
        self.key, self.value = key, value

    def state_dict(self, *args, **kwargs):
        return {self.key: self.value}


def test_a_corrupt_corpus_line_is_one_line_before_the_policy(bad, tmp_path):
    from stepopsd.envs.search.corpus import check_corpus

    with pytest.raises(UserError, match=r"corpus.jsonl:2: not a corpus line .*'id' and 'contents'"):
        check_corpus(str(bad["corpus"]))
    with pytest.raises(UserError, match="no corpus at"):
        check_corpus(str(tmp_path / "none.jsonl"))


def test_one_line_keeps_a_hydra_message_readable():
    message = "In 'train': Could not find 'algorithm/ppo'\n\nAvailable options in 'algorithm':\n\tgrpo\n\tstepopsd\n" \
              "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n"
    assert one_line(message) == "In 'train': Could not find 'algorithm/ppo'; Available options in 'algorithm': grpo, stepopsd"
    assert one_line("Key 'x' is not in struct\n    full_key: a.x\n    object_type=dict") == "Key 'x' is not in struct"


def test_generators_refuse_a_folder_that_is_not_their_own(games, tmp_path):
    """Nothing is written into someone's data: a non-empty folder is refused unless it is the generator's own
    (earlier or interrupted) output."""
    from stepopsd.envs.alfworld.generate import _own_output as own_games
    from stepopsd.envs.alfworld.generate import make_games
    from stepopsd.envs.search.generate import _own_output as own_qa
    from stepopsd.envs.search.generate import make_qa

    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for make, tool in ((make_games, "stepopsd-make-games"), (make_qa, "stepopsd-make-qa")):
        with pytest.raises(UserError, match=f"not a folder {tool} wrote"):
            make(str(foreign), 0)
    assert os.listdir(foreign) == ["notes.txt"]
    assert own_games(games) and own_games(str(tmp_path / "new")) and not own_games(str(foreign))
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "train.parquet")  # a parquet without the generated mark
    assert not own_qa(str(tmp_path)) and own_qa(str(tmp_path / "new"))
