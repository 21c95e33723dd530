"""Search-QA questions: Search-R1's parquet files, official and generated alike, read as `Task`s.

Search-R1 keeps one folder per data mix with `train.parquet` and `test.parquet` (e.g.
`nq_hotpotqa_train/`); each row has `question`, `golden_answers` (a list of strings) and
`data_source` (nq, hotpotqa, ...). Older exports carry the answers only in verl's
`reward_model = {"ground_truth": {"target": [...]}}`; the loader falls back to it.

Questions made by `stepopsd-make-qa` (stepopsd/envs/search/generate.py) use the same layout with
data sources `generated_singlehop` / `generated_multihop` and the file-level parquet metadata key
`stepopsd_generated`; their tasks have `generated=True` and must never be reported as NQ, HotpotQA
or any other Search-R1 result.
"""
from __future__ import annotations

import os

import pyarrow.parquet as pq

from stepopsd.errors import UserError
from stepopsd.types import Task

GENERATED_KEY = "stepopsd_generated"  # file-level parquet metadata of generated files
GENERATED_SINGLEHOP = "generated_singlehop"
GENERATED_MULTIHOP = "generated_multihop"
GENERATED_SOURCES = {GENERATED_SINGLEHOP: "single-hop", GENERATED_MULTIHOP: "multi-hop"}

# Search-R1: training on NQ + HotpotQA; evaluation on these seven, EM reported per data source.
SEARCH_R1_TRAIN_SOURCES = ("nq", "hotpotqa")
SEARCH_R1_SOURCES = {
    "nq": "single-hop",
    "triviaqa": "single-hop",
    "popqa": "single-hop",
    "hotpotqa": "multi-hop",
    "2wikimultihopqa": "multi-hop",
    "musique": "multi-hop",
    "bamboogle": "multi-hop",
}


class DataNotFoundError(UserError, FileNotFoundError):
    """No Search-QA parquet where the config points."""


class DataFormatError(UserError, ValueError):
    """A parquet file that is not Search-R1's format (columns missing, not parquet)."""


def hop_label(data_source: str) -> str:
    """"single-hop" / "multi-hop" for the known data sources, "" otherwise."""
    return SEARCH_R1_SOURCES.get(data_source) or GENERATED_SOURCES.get(data_source, "")


def parquet_path(path: str, split: str = "train") -> str:
    """The parquet file itself, or `<path>/<split>.parquet` when `path` is a folder."""
    path = os.path.expanduser(os.path.expandvars(path))
    return os.path.join(path, f"{split}.parquet") if os.path.isdir(path) else path


def load_questions(path: str, split: str = "train", data_sources=None, limit: int | None = None) -> list[Task]:
    """The questions of one Search-R1 parquet file as `Task`s, in file order.

    `path` is a parquet file or a folder holding `<split>.parquet`. `data_sources` keeps only those
    data sources (None, "all" or ["all"]: every one). `limit` keeps the first `limit` rows of EACH
    data source (in file order), which is what per-source evaluation wants; the result stays in
    file order. Task ids are `<split>/<data_source>/<row index in the file>`.
    """
    file = parquet_path(path, split)
    if not os.path.isfile(file):
        raise DataNotFoundError(
            f"no Search-QA parquet at {file}: prepare Search-R1's data with its data scripts (e.g. "
            f"scripts/data_process/nq_search.py), or generate offline questions with "
            f"`stepopsd-make-qa --out DIR --seed 0` and pass DIR as the data path")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for every row)")
    try:
        schema = pq.read_schema(file)
    except Exception as e:  # pyarrow.lib.ArrowInvalid: truncated, or not parquet at all
        raise DataFormatError(f"{file} is not a readable parquet file ({type(e).__name__}: {str(e)[:160]}); "
                              "regenerate it or prepare it with Search-R1's data scripts") from None
    names = set(schema.names)
    answer_column = "golden_answers" if "golden_answers" in names else "reward_model"
    missing = [c for c in ("question", "data_source") if c not in names]
    if answer_column not in names:
        missing.append("golden_answers (or reward_model)")
    if missing:
        raise DataFormatError(f"{file}: missing column(s) {', '.join(missing)}; a Search-R1 parquet needs "
                         f"question, golden_answers (or reward_model.ground_truth.target) and data_source")
    columns = ["question", "data_source", answer_column]
    if answer_column == "golden_answers" and "reward_model" in names:
        columns.append("reward_model")  # fallback for rows whose golden_answers is null
    table = pq.read_table(file, columns=columns)
    file_generated = _truthy((schema.metadata or {}).get(GENERATED_KEY.encode()))
    wanted = _wanted_sources(data_sources)
    rows = {c: table.column(c).to_pylist() for c in columns}
    seen: dict[str, int] = {}
    tasks = []
    for i, (question, source) in enumerate(zip(rows["question"], rows["data_source"])):
        source = str(source)
        if wanted is not None and source not in wanted:
            continue
        seen[source] = seen.get(source, 0) + 1
        if limit is not None and seen[source] > limit:
            continue
        answers = _answers(rows["golden_answers"][i]) if "golden_answers" in rows else ()
        if not answers and "reward_model" in rows:
            answers = _reward_model_answers(rows["reward_model"][i])
        tasks.append(Task(task_id=f"{split}/{source}/{i}", task_type=source, source=file, split=split,
                          generated=file_generated or source.startswith("generated"),
                          question=str(question or "").strip(), answers=answers))
    if not tasks:
        available = sorted(set(map(str, rows["data_source"])))
        raise DataNotFoundError(f"no questions in {file} for data sources {sorted(wanted) if wanted else 'all'}; "
                                f"the file has: {', '.join(available) or 'no rows'}")
    return tasks


def _wanted_sources(data_sources) -> set[str] | None:
    if data_sources is None:
        return None
    if isinstance(data_sources, str):
        data_sources = [data_sources]
    names = [str(s) for s in data_sources]
    return None if not names or "all" in names else set(names)


def _truthy(value) -> bool:
    return value is not None and value.decode().strip().lower() not in ("", "0", "false", "no")


def _answers(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(a) for a in value if a is not None)


def _reward_model_answers(value) -> tuple[str, ...]:
    truth = (value or {}).get("ground_truth")
    if isinstance(truth, dict):
        truth = truth.get("target")
    return _answers(truth)
