"""The BM25 index of the Search-QA corpus: `BM25Retriever(corpus)`, in process, no HTTP.

BM25 (the `bm25s` library, its tokenizer, English stopwords) over a `wiki-18.jsonl`-format corpus. The index
is built once and cached next to the corpus in `<corpus>.bm25s/`, keyed by the corpus file's size and mtime, so
a changed corpus is re-indexed. A batch of queries is scored in one sparse product over bm25s' score matrix
(same scores as `BM25.retrieve`, much faster top-k). Like Lucene/Pyserini it returns only passages that share
a term with the query (score > 0), so an empty or all-stopword query gets an empty list.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from typing import Sequence

from stepopsd.envs.search.corpus import Passage, read_corpus

INDEX_FORMAT = 1  # bump when the tokenisation or the cache layout changes
STOPWORDS = "en"


def _tokenize(texts: Sequence[str], **kw):
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, show_progress=False, **kw)


class BM25Retriever:
    """In-process BM25 over a `wiki-18.jsonl`-format corpus; `built` says whether this instance
    indexed the corpus (True) or loaded the cached index (False)."""

    def __init__(self, corpus_path: str, *, cache: bool = True):
        import bm25s

        self.corpus_path = os.path.abspath(corpus_path)
        if not os.path.isfile(self.corpus_path):
            raise FileNotFoundError(f"corpus file not found: {corpus_path}")
        self.passages = list(read_corpus(self.corpus_path))
        if not self.passages:
            raise ValueError(f"corpus {corpus_path} has no passages")
        self.cache_dir = self.corpus_path + ".bm25s"
        key = self._key()
        self.index, self.built, self._term_docs = None, False, None
        if cache and self._cached_key() == key:
            try:
                index = bm25s.BM25.load(self.cache_dir)
                if index.scores["num_docs"] == len(self.passages):
                    self.index = index
            except (OSError, ValueError, KeyError):
                self.index = None
        if self.index is None:
            self.index = bm25s.BM25()
            self.index.index(_tokenize([p.contents for p in self.passages]), show_progress=False)
            self.built = True
            if cache:
                self._save(key)

    def __len__(self) -> int:
        return len(self.passages)

    def _key(self) -> dict:
        st = os.stat(self.corpus_path)
        return {"format": INDEX_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _cached_key(self) -> dict | None:
        try:
            with open(os.path.join(self.cache_dir, "corpus_key.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _save(self, key: dict) -> None:
        """Write the index to a temporary folder, then rename it into place."""
        parent, name = os.path.split(self.cache_dir)
        try:
            tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        except OSError as e:  # read-only corpus folder: keep the index in memory only
            print(f"warning: cannot cache the BM25 index next to {self.corpus_path}: {e}", file=sys.stderr)
            return
        try:
            self.index.save(tmp)
            with open(os.path.join(tmp, "corpus_key.json"), "w") as f:
                json.dump(key, f)
            old = None
            if os.path.exists(self.cache_dir):
                old = f"{self.cache_dir}.old-{os.getpid()}-{threading.get_ident()}"
                os.rename(self.cache_dir, old)
            try:
                os.rename(tmp, self.cache_dir)
            except OSError:  # another process put its index there first
                pass
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Passage]]:
        """Top passages per query, best first, the whole batch scored at once.

        Scores are bm25s' own (its precomputed term-by-passage matrix summed over the query's
        tokens); the batch is one sparse product instead of `BM25.retrieve`, whose per-query
        `np.argpartition` over every passage costs ~7 ms a query at 50k passages, and it
        naturally yields only the passages that match.
        """
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not a string")
        if not queries:
            return []
        import numpy as np
        import scipy.sparse

        k = max(1, min(int(topk), len(self.passages)))
        if self._term_docs is None:
            sc = self.index.scores  # CSC (passages x terms) == CSR (terms x passages)
            self._term_docs = scipy.sparse.csr_matrix(
                (sc["data"], sc["indices"], sc["indptr"]), shape=(len(sc["indptr"]) - 1, sc["num_docs"]))
        vocab = self.index.vocab_dict
        rows, cols = [], []
        for i, toks in enumerate(_tokenize([q or "" for q in queries], return_ids=False)):
            ids = [vocab[t] for t in toks if t and t in vocab]
            rows += [i] * len(ids)
            cols += ids
        q = scipy.sparse.csr_matrix((np.ones(len(rows), dtype=self._term_docs.dtype), (rows, cols)),
                                    shape=(len(queries), self._term_docs.shape[0]))  # duplicates add up
        scores = (q @ self._term_docs).tocsr()
        out = []
        for i in range(len(queries)):
            lo, hi = scores.indptr[i], scores.indptr[i + 1]
            docs, vals = scores.indices[lo:hi], scores.data[lo:hi]
            keep = vals > 0
            docs, vals = docs[keep], vals[keep]
            if len(vals) > k:
                top = np.argpartition(-vals, k - 1)[:k]
                docs, vals = docs[top], vals[top]
            order = np.lexsort((docs, -vals))  # best first, ties by corpus order
            out.append([Passage(self.passages[d].id, self.passages[d].contents, float(v))
                        for d, v in zip(docs[order].tolist(), vals[order].tolist())])
        return out
