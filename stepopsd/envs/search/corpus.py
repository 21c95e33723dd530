"""Search-QA passages: the `wiki-18.jsonl` corpus format and the retriever interface.

A corpus is JSON lines, one passage each: `{"id": "...", "contents": "\\"Title\\"\\ntext"}` (Search-R1's
format: the title in double quotes on the first line, the passage text after the newline). Every
retriever, the in-process BM25 index and the HTTP client of a Search-R1-compatible server alike,
answers `search(queries, topk)` with one list of `Passage` per query, best first.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from stepopsd.errors import UserError


class CorpusError(UserError, ValueError):
    """A corpus file that is missing or not in the wiki-18.jsonl format."""


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str  # '"Title"\ntext', as stored in the corpus
    score: float | None = None

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0].strip().strip('"')

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1].strip() if len(parts) > 1 else ""


class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Passage]]: ...


def read_corpus(path: str) -> Iterator[Passage]:
    """Passages of a `wiki-18.jsonl`-format file, in file order."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Passage(str(row["id"]), row["contents"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusError(f"{path}:{n}: not a corpus line ({type(e).__name__}: {e}); each line must be JSON with "
                                  "'id' and 'contents' (wiki-18.jsonl format)") from None


def check_corpus(path: str, lines: int = 100) -> None:
    """The corpus file exists and its first `lines` lines are corpus lines (a cheap check before any work;
    a full wiki-18 has 21M lines)."""
    if not os.path.isfile(path):
        raise CorpusError(f"no corpus at {path}: set env.retriever.corpus to a wiki-18.jsonl-format file, or generate "
                          "offline data with `stepopsd-make-qa --out DIR`")
    seen = 0
    for seen, _ in enumerate(read_corpus(path), 1):
        if seen >= lines:
            break
    if not seen:
        raise CorpusError(f"{path} holds no passages: point env.retriever.corpus at a wiki-18.jsonl-format file")


def passage_line(pid: str, title: str, text: str) -> str:
    """One corpus line in the `wiki-18.jsonl` format."""
    return json.dumps({"id": pid, "contents": f'"{title}"\n{text}'}, ensure_ascii=False)
