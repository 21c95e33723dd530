"""The retrieval client: `RetrieverClient(url)` for any Search-R1-compatible server, and `check_retriever(url)`.

The client sends batches of queries with bounded retries; a server that cannot be reached raises
`RetrieverUnavailable`. `check_retriever(url)` probes a server once before a run's expensive work. Every error
a user can fix is a `RetrieverError` (a `stepopsd.errors.UserError`) with one line that says how. The client
speaks HTTP only: it knows nothing of the index, and of the run's own server (`service.LocalRetrieverServer`)
only what `RestartableServer` says.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol, Sequence

from stepopsd.envs.search.corpus import Passage
from stepopsd.envs.search.retrieval.server import Limits
from stepopsd.errors import UserError


class RestartableServer(Protocol):
    """The run's own server as its clients see it (`service.LocalRetrieverServer`)."""

    log_path: str | None
    restarts: int

    def ensure_alive(self) -> bool: ...


class RetrieverError(UserError):
    """A retriever problem the user can fix (a malformed URL, nothing listening, a server of another API)."""


class RetrieverUnavailable(RetrieverError, ConnectionError):
    """The retrieval server could not be reached (refused, timed out or 5xx after retries)."""


class RetrieverRequestError(RetrieverError, ValueError):
    """The retrieval server rejected the request (HTTP 4xx)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class RetrieverProtocolError(RetrieverError, ValueError):
    """The server answered, but not as a Search-R1 retriever does."""


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix: the reason, and what to tell the user."""

    def __init__(self, reason: str, hint: str):
        super().__init__(reason)
        self.hint = hint


def _passage(item: Any) -> Passage:
    score = None
    if isinstance(item, dict) and "document" in item:
        score = item.get("score")
        item = item["document"]
    if not isinstance(item, dict):
        raise RetrieverProtocolError(f"unexpected retrieval result item: {item!r:.200}")
    contents = item.get("contents")
    if contents is None:
        contents = f'"{item.get("title", "")}"\n{item.get("text", "")}'
    return Passage(str(item.get("id", "")), contents, None if score is None else float(score))


class RetrieverClient:
    """Client of a Search-R1-compatible retrieval server (`url` with or without `/retrieve`).

    A search sends the queries as the JSON body of `POST /retrieve` (nothing of them goes into the URL),
    at most `max_batch` queries a request, each cut to `max_query_chars` characters (the server's
    defaults; the paper's E5 retriever reads only a query's first 256 tokens anyway). A request that
    finds the server unreachable is tried `retries` more times; with `server` (a `LocalRetrieverServer`
    this run owns) a server whose process died is then restarted and the request tried once more.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5,
                 max_batch: int = Limits.max_queries, max_query_chars: int = Limits.max_query_chars,
                 server: RestartableServer | None = None):
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        try:
            port = parts.port if parts else None
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise RetrieverError(f"retriever URL {url!r} is malformed: expected http://HOST:PORT/retrieve "
                                 f"(env.retriever.url)")
        self.base = re.sub(r"/(retrieve|health)?/?$", "", url.rstrip("/"))
        self.url = self.base + "/retrieve"
        self.host, self.port = parts.hostname, port or (443 if parts.scheme == "https" else 80)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_batch, self.max_query_chars, self.server = max_batch, max_query_chars, server

    def _retry(self, e: Exception) -> "_Retry":
        """The reason an attempt failed, and the fix to suggest if every attempt fails so."""
        r = getattr(e, "reason", e)
        if isinstance(r, socket.gaierror):
            return _Retry(f"host {self.host!r} does not resolve", "fix the host in env.retriever.url")
        if isinstance(r, TimeoutError):
            return _Retry(f"no answer within {self.timeout:g} s",
                          "is the server overloaded? raise env.retriever.timeout if it is just slow")
        start = (f"start one with `stepopsd-retriever --corpus FILE --port {self.port}` "
                 f"or set env.retriever.start_server=true")
        if isinstance(r, ConnectionRefusedError):
            return _Retry("connection refused: nothing listens there", start)
        return _Retry(" ".join(f"{type(r).__name__}: {r}".split()), start)

    def _once(self, url: str, data: bytes | None) -> Any:
        """One request: the decoded JSON reply; RetrieverRequestError on a 4xx (or 501), _Retry on what may pass."""
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            detail = " ".join(str(detail).split())[:200]
            if e.code < 500 or e.code == 501:  # 501: the server has no POST at all
                raise RetrieverRequestError(f"{url} answered HTTP {e.code}: {detail}", e.code) from None
            raise _Retry(f"HTTP {e.code}: {detail}", "see the server's log") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timed out, cut short
            raise self._retry(e) from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise RetrieverProtocolError(f"{url} answered with a body that is not JSON ({body[:60]!r}): "
                                         f"not a Search-R1 retriever") from None

    def _call(self, path: str, payload: dict | None = None) -> Any:
        url = self.base + path
        data = None if payload is None else json.dumps(payload, ensure_ascii=False).encode()
        restarts = getattr(self.server, "restarts", 0)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._once(url, data)
            except _Retry as e:
                last = e
        attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        hint = last.hint
        if self.server is not None:
            hint = f"see the log of the run's own server, {self.server.log_path}"
            try:
                self.server.ensure_alive()
            except Exception as e:  # noqa: BLE001 - reported in the one line below
                hint += f"; it could not be restarted: {e}"
            if self.server.restarts != restarts:  # restarted (here or by another thread): try once more
                try:
                    return self._once(url, data)
                except _Retry as e:
                    last, attempts = e, attempts + " and a restart"
        raise RetrieverUnavailable(f"retriever at {url} unavailable after {attempts} ({last}); {hint}")

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Passage]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not a string")
        queries = [q[:self.max_query_chars] for q in queries]
        out = []
        for i in range(0, len(queries), self.max_batch):
            batch = queries[i:i + self.max_batch]
            reply = self._call("/retrieve", {"queries": batch, "topk": int(topk), "return_scores": True})
            result = reply.get("result") if isinstance(reply, dict) else None
            if not isinstance(result, list) or len(result) != len(batch) or not all(isinstance(r, list) for r in result):
                raise RetrieverProtocolError(
                    f"{self.url} answered JSON without a 'result' list of {len(batch)} lists (one per query): "
                    f"not a Search-R1 retriever ({json.dumps(reply)[:80]})")
            out += [[_passage(item) for item in row] for row in result]
        return out

    def health(self) -> dict:
        return self._call("/health")


def check_retriever(url: str, timeout: float = 10.0) -> None:
    """Probe the retriever at `url` with one small real search, before any expensive work.

    Raises a `RetrieverError` with one line saying how to fix it when the URL is malformed, the host
    does not resolve, nothing listens there, or the server answers another API (a 4xx on
    `POST /retrieve`, a reply that is not JSON or holds no result list per query)."""
    client = RetrieverClient(url, timeout=timeout, retries=0)
    try:
        client.search(["stepopsd retriever check"], topk=1)
    except RetrieverRequestError as e:
        raise RetrieverProtocolError(f"{e}: not a Search-R1 retriever (a server that answers another API?); "
                                     f"point env.retriever.url at one") from None
    except RetrieverProtocolError as e:
        raise RetrieverProtocolError(f"{e}; point env.retriever.url at one") from None
