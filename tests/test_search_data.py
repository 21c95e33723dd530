"""Generated Search-QA data (stepopsd-make-qa) and the Search-R1 parquet loader."""
import json
import os
import re
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepopsd.envs.search.corpus import read_corpus
from stepopsd.envs.search.data import (GENERATED_MULTIHOP, GENERATED_SINGLEHOP, SEARCH_R1_SOURCES,
                                       SEARCH_R1_TRAIN_SOURCES, DataNotFoundError, hop_label, load_questions)
from stepopsd.envs.search.generate import MARKERS, ORG_KINDS, expert_steps, main, make_qa

FILES = ("corpus.jsonl", "train.parquet", "test.parquet")
SMALL = dict(num_entities=80, train_questions=30, test_questions=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    report = make_qa(str(out), seed=0)  # default sizes
    return out, report


def _bytes(folder):
    return {f: (folder / f).read_bytes() for f in FILES}


def _mentions(text, phrase):
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def _rows(folder, split):
    return pq.read_table(folder / f"{split}.parquet").to_pylist()


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    out, _ = data
    make_qa(str(tmp_path / "again"), seed=0)
    assert _bytes(tmp_path / "again") == _bytes(out)
    make_qa(str(tmp_path / "other"), seed=1)
    other = _bytes(tmp_path / "other")
    assert all(other[f] != _bytes(out)[f] for f in FILES)


def test_default_sizes_and_report(data):
    out, report = data
    assert report.questions == {"train": {GENERATED_SINGLEHOP: 200, GENERATED_MULTIHOP: 200},
                                "test": {GENERATED_SINGLEHOP: 50, GENERATED_MULTIHOP: 50}}
    assert sum(report.entities.values()) == 300 and report.distractors > 0
    assert 400 <= report.passages <= 600
    table = report.table()
    assert "generated" in table and "generated_multihop" in table and str(report.passages) in table
    assert len(report.relations["train"]) >= 12  # the relations are all used


def test_corpus_format(data):
    out, report = data
    passages = list(read_corpus(str(out / "corpus.jsonl")))
    assert [p.id for p in passages] == [str(i) for i in range(report.passages)]
    for line, p in zip((out / "corpus.jsonl").read_text().splitlines(), passages):
        assert json.loads(line).keys() == {"id", "contents"}
        assert p.contents.startswith(f'"{p.title}"\n') and p.text
        # every invented name word carries a medial marker no English word has
        for word in p.title.split():
            assert word in ("River",) + ORG_KINDS or any(m in word for m in MARKERS), word


def test_parquet_format(data):
    out, _ = data
    for split in ("train", "test"):
        f = pq.ParquetFile(out / f"{split}.parquet")
        schema = f.schema_arrow
        assert schema.names == ["id", "question", "golden_answers", "data_source", "metadata"]
        answers_type = schema.field("golden_answers").type
        assert pa.types.is_list(answers_type) and answers_type.value_type == pa.string()
        for name in ("id", "question", "data_source", "metadata"):
            assert schema.field(name).type == pa.string()
        assert f.metadata.metadata[b"stepopsd_generated"] == b"1"
        rows = _rows(out, split)
        assert [r["id"] for r in rows] == [f"{split}_{i}" for i in range(len(rows))]
        assert {r["data_source"] for r in rows} == {GENERATED_SINGLEHOP, GENERATED_MULTIHOP}


def test_answers_only_in_their_passages(data):
    out, _ = data
    text = {p.id: p.contents for p in read_corpus(str(out / "corpus.jsonl"))}
    for split in ("train", "test"):
        for r in _rows(out, split):
            m = json.loads(r["metadata"])
            answer = r["golden_answers"][0]
            hops = 2 if r["data_source"] == GENERATED_MULTIHOP else 1
            assert m["hops"] == hops == len(m["support"]) == len(m["queries"]) == len(m["path"])
            assert (m["bridge"] is not None) == (hops == 2)
            assert not any(_mentions(r["question"], a) for a in r["golden_answers"])
            assert _mentions(r["question"], m["subject"])
            assert _mentions(text[m["support"][-1]], answer)
            # each hop's fact (its subject and object together) is stated in exactly the listed passage
            names = [m["subject"]] + ([m["bridge"]] if m["bridge"] else [])
            objects = names[1:] + [answer]
            for s, o, pid in zip(names, objects, m["support"]):
                assert [i for i, t in text.items() if _mentions(t, s) and _mentions(t, o)] == [pid], (r, s, o)
            if hops == 2:  # the first passage gives the bridge, never the answer
                assert _mentions(text[m["support"][0]], m["bridge"])
                assert not _mentions(text[m["support"][0]], answer)


def test_train_and_test_ask_about_different_entities(data):
    out, _ = data
    subjects = {s: {json.loads(r["metadata"])["subject"] for r in _rows(out, s)} for s in ("train", "test")}
    assert subjects["train"] and subjects["test"] and not subjects["train"] & subjects["test"]
    questions = {s: {r["question"] for r in _rows(out, s)} for s in ("train", "test")}
    assert len(questions["train"]) == 400 and len(questions["test"]) == 100


def test_expert_steps(data):
    out, _ = data
    for r in _rows(out, "test"):
        m = json.loads(r["metadata"])
        steps = expert_steps(m, r["golden_answers"])
        assert steps == expert_steps(r["metadata"], tuple(r["golden_answers"]))  # JSON string accepted too
        assert len(steps) == m["hops"] + 1
        assert [a for _, a in steps[:-1]] == [f"<search> {q} </search>" for q in m["queries"]]
        assert steps[-1][1] == f"<answer> {r['golden_answers'][0]} </answer>"
        assert all(think and think == think.lower() for think, _ in steps)
        assert steps[-1][0].endswith(f"the answer is {r['golden_answers'][0].lower()}.")
        if m["hops"] == 2:
            assert m["bridge"].lower() in steps[1][0]


def test_loader_round_trip(data):
    out, _ = data
    tasks = load_questions(str(out), "train")
    rows = _rows(out, "train")
    assert len(tasks) == len(rows) == 400
    for i, (t, r) in enumerate(zip(tasks, rows)):
        assert t.task_id == f"train/{r['data_source']}/{i}" and t.task_type == r["data_source"]
        assert t.source == str(out / "train.parquet") and t.split == "train" and t.generated
        assert t.data_label == "generated"
        assert t.question == r["question"] and t.answers == tuple(r["golden_answers"])
    assert load_questions(str(out / "test.parquet"), "test")[0].source == str(out / "test.parquet")
    multi = load_questions(str(out), "train", data_sources=[GENERATED_MULTIHOP])
    assert len(multi) == 200 and {t.task_type for t in multi} == {GENERATED_MULTIHOP}
    assert len(load_questions(str(out), "train", data_sources=["all"])) == 400
    assert len(load_questions(str(out), "train", data_sources="all")) == 400
    limited = load_questions(str(out), "train", limit=3)  # first 3 of each data source, in file order
    assert len(limited) == 6
    assert [t.task_id for t in limited] == sorted((t.task_id for t in limited), key=lambda x: int(x.rsplit("/", 1)[1]))
    for source in (GENERATED_SINGLEHOP, GENERATED_MULTIHOP):
        assert [t for t in limited if t.task_type == source] == [t for t in tasks if t.task_type == source][:3]
    with pytest.raises(DataNotFoundError, match="generated_multihop"):
        load_questions(str(out), "train", data_sources=["nq"])


def test_loader_reads_search_r1_reward_model_shape(tmp_path):
    table = pa.table({
        "id": ["train_0", "train_1", "train_2"],
        "question": ["  who wrote the book?  ", "where is it", "when"],
        "data_source": ["nq", "hotpotqa", "nq"],
        "prompt": [[{"role": "user", "content": "..."}]] * 3,
        "reward_model": [{"style": "rule", "ground_truth": {"target": ["A", "B"]}},
                         {"style": "rule", "ground_truth": {"target": ["C"]}},
                         {"style": "rule", "ground_truth": {"target": ["D"]}}],
    })
    folder = tmp_path / "nq_hotpotqa_train"
    folder.mkdir()
    pq.write_table(table, folder / "train.parquet")
    tasks = load_questions(str(folder), "train")
    assert [t.answers for t in tasks] == [("A", "B"), ("C",), ("D",)]
    assert [t.question for t in tasks] == ["who wrote the book?", "where is it", "when"]
    assert [t.task_id for t in tasks] == ["train/nq/0", "train/hotpotqa/1", "train/nq/2"]
    assert not any(t.generated for t in tasks) and tasks[0].data_label == "official"
    assert [t.task_id for t in load_questions(str(folder), "train", data_sources=["nq"], limit=1)] == ["train/nq/0"]
    # a file-level generated marker labels every row generated, whatever its data_source
    pq.write_table(table.replace_schema_metadata({"stepopsd_generated": "1"}), tmp_path / "gen.parquet")
    assert all(t.generated for t in load_questions(str(tmp_path / "gen.parquet")))


def test_loader_errors_are_one_line(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_questions(str(tmp_path), "test")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "test.parquet") in msg
    assert "Search-R1" in msg and "stepopsd-make-qa --out DIR --seed 0" in msg
    assert isinstance(e.value, FileNotFoundError)
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError) as e:
        load_questions(str(tmp_path / "bad.parquet"))
    assert "\n" not in str(e.value) and "data_source" in str(e.value) and "golden_answers" in str(e.value)


def test_source_tables():
    assert SEARCH_R1_TRAIN_SOURCES == ("nq", "hotpotqa")
    assert list(SEARCH_R1_SOURCES) == ["nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"]
    assert [hop_label(s) for s in ("nq", "musique", GENERATED_SINGLEHOP, GENERATED_MULTIHOP, "x")] == \
        ["single-hop", "multi-hop", "single-hop", "multi-hop", ""]


def test_console_script_matches_in_process(tmp_path, console_script):
    cmd = [console_script("stepopsd-make-qa")]
    env = dict(os.environ, PYTHONHASHSEED="7")  # other string hashing: the bytes must not change
    args = ["--out", str(tmp_path / "cli"), "--seed", "3", "--entities", "80", "--train", "30", "--test", "10"]
    done = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "generated" in done.stdout and "generated_singlehop" in done.stdout
    make_qa(str(tmp_path / "lib"), seed=3, **SMALL)
    assert _bytes(tmp_path / "cli") == _bytes(tmp_path / "lib")
    assert len(load_questions(str(tmp_path / "cli"), "test")) == 10


def test_bad_sizes(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--entities", "10"]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(ValueError, match="raise --entities"):
        make_qa(str(tmp_path / "y"), seed=0, num_entities=40, train_questions=5000, test_questions=10)
