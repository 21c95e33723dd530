"""Search-QA as a run uses it (`env=search`): questions in `<data.path>/<split>.parquet` (a generated corpus and
questions when `data.generate` asks for them), answered by `SearchEnv` against a retriever: a running one at
`env.retriever.url`, or a `stepopsd-retriever` (BM25) the run starts on its corpus and stops at the end; peers written
as their responses without `<information>`; the tiny policy warm-started on expert search-then-answer episodes."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, field

from stepopsd.envs.registry import EnvConfig, EnvSpec, register_env
from stepopsd.envs.search.protocol import peer_lines


@dataclass
class RetrieverKnobs:
    url: str | None = "http://127.0.0.1:8000/retrieve"  # a running Search-R1-compatible server (the paper's E5, or stepopsd-retriever)
    start_server: bool = False  # true: the run starts stepopsd-retriever (BM25) on `corpus` and stops it at the end
    corpus: str | None = None  # wiki-18.jsonl-format corpus for start_server (None: <data.path>/corpus.jsonl)
    timeout: float = 10
    retries: int = 2


@dataclass
class SearchConfig(EnvConfig):
    """Search-QA protocol (environments.md; Search-R1 tags, verl-agent step layout): at most 4 steps, history 4,
    top-3 passages, invalid-action penalty 0.01, reward = exact match."""

    max_steps: int = 4
    history_length: int = 4
    success_metric: str = "em"  # validation reports exact match per data source
    target_span: str = "clean_step_no_observation"  # the step's text without the <information> the env inserted
    peer_budget_tokens: int = 1024
    anchor_similarity: float = 0.9  # retrieved passages rarely repeat exactly: verl-agent's GiGPO Search script
    topk: int = 3
    invalid_penalty: float = 0.01
    retriever: RetrieverKnobs = field(default_factory=RetrieverKnobs)


@register_env("search")
class SearchSpec(EnvSpec):
    config = SearchConfig

    def check(self, cfg):
        e = cfg.env
        if e.topk < 1 or e.invalid_penalty < 0:
            raise ValueError(f"env.topk={e.topk}, env.invalid_penalty={e.invalid_penalty}: need topk >= 1 and a penalty >= 0")
        if not e.retriever.start_server and not e.retriever.url:
            raise ValueError("env.retriever.url is empty: point it at a Search-R1 retriever or set env.retriever.start_server=true")

    def prepare_data(self, cfg):
        path, gen = cfg.data.path, cfg.data.generate
        if gen is not None and path and not os.path.isfile(os.path.join(path, f"{cfg.data.train_split}.parquet")):
            from stepopsd.envs.search.generate import make_qa

            print(f"[generated questions] writing a Search-QA corpus and questions to {path} (seed {gen.seed})")
            print(make_qa(path, gen.seed, num_entities=gen.entities, train_questions=gen.train,
                          test_questions=gen.test).table())
        return path

    def load_split(self, cfg, data, split, types, limit=None):
        from stepopsd.envs.search.data import load_questions

        return load_questions(data, split, list(types), limit=limit)

    def corpus(self, cfg, data):
        """The wiki-18-format corpus a local retriever serves (default: the data folder's corpus.jsonl)."""
        return cfg.env.retriever.corpus or os.path.join(data, "corpus.jsonl")

    def check_services(self, cfg, data):
        if cfg.env.retriever.start_server:
            from stepopsd.envs.search.corpus import check_corpus

            check_corpus(self.corpus(cfg, data))
        else:  # one small real request: a wrong URL or a server of another API is one line now, not after the policy
            from stepopsd.envs.search.retrieval import check_retriever

            check_retriever(cfg.env.retriever.url, timeout=cfg.env.retriever.timeout)

    @contextlib.contextmanager
    def services(self, cfg, data):
        """The retriever for the run: its URL or, when `env.retriever.start_server` says so, a `stepopsd-retriever`
        (BM25) started on the corpus, restarted if its process dies, and stopped at the end."""
        r = cfg.env.retriever
        if not r.start_server:
            yield r.url
            return
        from stepopsd.envs.search.retrieval import LocalRetrieverServer

        with LocalRetrieverServer(self.corpus(cfg, data)) as server:
            print(f"[retriever] BM25 server on {self.corpus(cfg, data)} at {server.url}")
            yield server

    def env_factory(self, cfg, service=None):
        """`service`: what `services` yields (a URL, or the run's own server, whose clients restart it)."""
        from stepopsd.envs.search.env import SearchEnv
        from stepopsd.envs.search.retrieval import LocalRetrieverServer, RetrieverClient

        e = cfg.env
        kw = dict(timeout=e.retriever.timeout, retries=e.retriever.retries)
        client = service.client(**kw) if isinstance(service, LocalRetrieverServer) else RetrieverClient(service, **kw)
        return functools.partial(SearchEnv, client, max_steps=e.max_steps, history_length=e.history_length, topk=e.topk,
                                 compact=e.compact, require_think=e.require_think, invalid_penalty=e.invalid_penalty)

    peer_lines = staticmethod(peer_lines)

    def check_demonstrations(self, sft):
        if not sft.corpus:
            raise ValueError(f"sft: env={self.name!r} needs a corpus (the one the demonstrations search)")

    def demonstrations(self, sft, path, workers, log):
        from stepopsd.envs.search.corpus import read_corpus
        from stepopsd.envs.search.data import load_questions
        from stepopsd.envs.search.demos import format_response, search_demos
        from stepopsd.envs.search.retrieval import BM25Retriever

        tasks = load_questions(sft.data, "train", list(sft.task_types))
        label = "+".join(sorted({t.data_label for t in tasks}))
        log(f"[{label} questions] building the tiny policy: demonstrations from {len(tasks)} questions, tokenizer, SFT")
        records = search_demos(tasks, BM25Retriever(sft.corpus), compact=sft.compact, history_length=sft.history_length)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        texts = [p.contents for p in read_corpus(sft.corpus)]
        return records, texts, format_response("i need the town.", "<search> kezvo town </search>"), label
