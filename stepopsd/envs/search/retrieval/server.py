"""The retrieval HTTP server: the Search-R1 retrieval API over any retriever with `search` and `len`.

`make_server(retriever, host, port, limits)` answers `POST /retrieve` with `{"queries": [...], "topk": k,
"return_scores": bool}` by `{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}` (without
scores each item is the document itself), and `GET /health`. Standard library only (ThreadingHTTPServer). A
request beyond its `Limits` (queries per request, characters per query, topk, body bytes: checked from
Content-Length before the body is read) or malformed gets a 4xx and a one-line JSON error. It knows nothing of
the index (`index`): the `stepopsd-retriever` command (`service.main`) puts the two together.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, Sequence

from stepopsd.envs.search.corpus import Passage


class Searcher(Protocol):
    """What the server serves: `BM25Retriever` (`index`) or anything with the same two methods."""

    def __len__(self) -> int: ...

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Passage]]: ...


def _document(p: Passage) -> dict:
    return {"id": p.id, "contents": p.contents}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; anything beyond is a 4xx with a one-line JSON error.
    The body limit covers `max_queries` queries of `max_query_chars` characters in UTF-8."""
    max_queries: int = 512
    max_query_chars: int = 2000
    topk_max: int = 50
    max_body_bytes: int = 8 << 20
    read_timeout: float = 30.0  # seconds a client may take to send its request


class _BadRequest(ValueError):
    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def _parse_request(body: bytes, limits: Limits) -> tuple[list[str], int, bool]:
    try:
        req = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _BadRequest("body is not JSON")
    if not isinstance(req, dict) or "queries" not in req:
        raise _BadRequest('expected a JSON object with "queries"')
    queries = req["queries"]
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise _BadRequest('"queries" must be a list of strings')
    if len(queries) > limits.max_queries:
        raise _BadRequest(f"{len(queries)} queries in one request, above this server's limit {limits.max_queries} "
                          f"(--max-queries): send smaller batches")
    longest = max(map(len, queries), default=0)
    if longest > limits.max_query_chars:
        raise _BadRequest(f"a query of {longest} characters, above this server's limit {limits.max_query_chars} "
                          f"(--max-query-chars)")
    topk = req.get("topk", 3)
    if topk is None:
        topk = 3
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise _BadRequest(f'"topk" must be an integer >= 1, got {topk!r:.50}')
    if topk > limits.topk_max:
        raise _BadRequest(f'"topk" {topk} is above this server\'s limit {limits.topk_max} (--topk-max)')
    return queries, topk, bool(req.get("return_scores", False))


def make_server(retriever: Searcher, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits = Limits()) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer answering the Search-R1 API from `retriever` (not yet serving)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.read_timeout  # a client that stalls mid-request frees its thread

        def _reply(self, code: int, obj: Any) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client went away
                self.close_connection = True

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "passages": len(retriever)})
            else:
                self._reply(404, {"error": f"no such path {self.path:.100}; use POST /retrieve or GET /health"})

        def _body(self) -> bytes:
            """The request body, its size checked against the limit before any of it is read."""
            length = self.headers.get("Content-Length")
            if length is None or self.headers.get("Transfer-Encoding"):
                raise _BadRequest("a Content-Length header is required (chunked bodies are not accepted)", 411)
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                raise _BadRequest(f"bad Content-Length {length!r:.30}")
            if n > limits.max_body_bytes:
                raise _BadRequest(f"request body of {n} bytes is above this server's limit {limits.max_body_bytes} "
                                  f"(--max-body-bytes)", 413)
            body = self.rfile.read(n)
            if len(body) < n:
                raise _BadRequest(f"body ended after {len(body)} of {n} bytes")
            return body

        def do_POST(self):
            if self.path.rstrip("/") != "/retrieve":
                self.close_connection = True  # its body stays unread
                self._reply(404, {"error": f"no such path {self.path:.100}; use POST /retrieve"})
                return
            try:
                queries, topk, with_scores = _parse_request(self._body(), limits)
            except _BadRequest as e:
                self.close_connection = True
                self._reply(e.code, {"error": str(e)})
                return
            try:
                hits = retriever.search(queries, topk)
            except Exception as e:  # noqa: BLE001 - report, keep serving
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})
                return
            if with_scores:
                result = [[{"document": _document(p), "score": p.score} for p in row] for row in hits]
            else:
                result = [[_document(p) for p in row] for row in hits]
            self._reply(200, {"result": result})

        def log_message(self, format, *args):  # no access log: the log must not grow per request
            pass

    return _Server((host, port), Handler)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 drops bursts of clients)


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
