"""Expert demonstrations for Search-QA SFT, played through the real environment and retriever.

The generator stores, per question, what an expert needs (`metadata`: the queries in hop order);
`expert_steps` turns that into (reasoning, action) steps. Each step is played in a `SearchEnv`
over the real retriever, so every later prompt holds the `<information>` block the retriever really
returned, exactly as a rollout would. Only episodes the expert answers correctly are kept. The
records say which data they come from (generated questions on a generated corpus).
"""
from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.parquet as pq

from stepopsd.envs.search.corpus import Retriever
from stepopsd.envs.search.env import SearchEnv
from stepopsd.envs.search.generate import expert_steps
from stepopsd.progress import Progress
from stepopsd.types import Task


def format_response(think: str, action: str) -> str:
    """A well-formed step: reasoning, then one action (Search-R1's tags)."""
    return f"<think> {think} </think>\n{action}"


def _metadata(tasks: list[Task]) -> dict[str, dict]:
    """Expert metadata by task id, read from the parquet files the tasks come from."""
    rows = defaultdict(list)
    for t in tasks:
        rows[t.source].append(t)
    out = {}
    for source, ts in rows.items():
        column = pq.read_table(source, columns=["metadata"]).column("metadata").to_pylist()
        for t in ts:
            out[t.task_id] = json.loads(column[int(t.task_id.rsplit("/", 1)[1])])
    return out


def search_demos(tasks: list[Task], retriever: Retriever, *, compact: bool, history_length: int = 4,
                 max_steps: int = 4) -> list[dict]:
    """One {prompt, response} record per expert step of every correctly answered question."""
    meta = _metadata(tasks)
    env = SearchEnv(retriever, max_steps=max_steps, history_length=history_length, compact=compact)
    records, won = [], 0
    with Progress("demos", len(tasks), "question", description="Expert demonstrations") as bar:
        for task in tasks:
            env.reset([task], 1)
            episode = []
            for think, action in expert_steps(meta[task.task_id], task.answers)[:max_steps]:
                prompt, response = env.prompt(0), format_response(think, action)
                episode.append({"task_id": task.task_id, "task_type": task.task_type, "data": task.data_label,
                                "prompt": prompt, "response": response})
                transition = env.step({0: response})[0]
                if transition.state.done:
                    break
            if env.states[0].won:
                records += episode
                won += 1
            bar.advance(won=won)
    return records
