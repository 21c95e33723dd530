"""Search-QA retrieval: a BM25 index, a Search-R1-compatible HTTP server and its client.

- `BM25Retriever(corpus)`: BM25 (the `bm25s` library, its tokenizer, English stopwords) over a
  `wiki-18.jsonl`-format corpus. The index is built once and cached next to the corpus in
  `<corpus>.bm25s/`, keyed by the corpus file's size and mtime, so a changed corpus is re-indexed.
  A batch of queries is scored in one sparse product over bm25s' score matrix (same scores as
  `BM25.retrieve`, much faster top-k). Like Lucene/Pyserini it returns only passages that share a
  term with the query (score > 0), so an empty or all-stopword query gets an empty list.
- `stepopsd-retriever --corpus FILE [--host H] [--port N]` (`main`): serves the Search-R1 retrieval API,
  `POST /retrieve` with `{"queries": [...], "topk": k, "return_scores": bool}` answered by
  `{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}` (without scores each
  item is the document itself), and `GET /health`. Standard library only (ThreadingHTTPServer).
  It listens on loopback unless `--host` says otherwise (then it warns), and answers a request beyond
  its `Limits` (queries per request, characters per query, topk, body bytes: checked from
  Content-Length before the body is read) or malformed with a 4xx and a one-line JSON error.
- `RetrieverClient(url)`: a client for any Search-R1-compatible server, with bounded retries;
  a server that cannot be reached raises `RetrieverUnavailable`. `check_retriever(url)` probes a
  server once before a run's expensive work. Every error a user can fix is a `RetrieverError`
  (a `stepopsd.errors.UserError`) with one line that says how.
- `LocalRetrieverServer(corpus)`: a context manager that runs the server as a subprocess (used
  when the training config asks the project to start its own retriever); its clients restart it
  on the same port when its process died.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from stepopsd.envs.search.corpus import Passage, read_corpus
from stepopsd.errors import UserError

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- server


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


def make_server(retriever: BM25Retriever, host: str = "127.0.0.1", port: int = 8000,
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


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepopsd-retriever",
                                 description="BM25 retrieval server speaking the Search-R1 API.")
    ap.add_argument("--corpus", required=True, help="wiki-18.jsonl-format corpus file")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback only; 0.0.0.0 opens it to the network)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    d = Limits()
    ap.add_argument("--topk-max", type=int, default=d.topk_max)
    ap.add_argument("--max-queries", type=int, default=d.max_queries, help="queries per request")
    ap.add_argument("--max-query-chars", type=int, default=d.max_query_chars, help="characters per query")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="bytes per request body")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write <corpus>.bm25s/")
    args = ap.parse_args(argv)
    prog = "stepopsd-retriever"
    if not os.path.isfile(args.corpus):
        print(f"{prog}: error: corpus file not found: {args.corpus}", file=sys.stderr)
        return 2
    limits = Limits(args.max_queries, args.max_query_chars, args.topk_max, args.max_body_bytes)
    t0 = time.time()
    try:
        retriever = BM25Retriever(args.corpus, cache=not args.no_cache)
        server = make_server(retriever, args.host, args.port, limits)
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    if not _loopback(host):
        print(f"{prog}: warning: listening on {host}, not loopback: anyone who can reach this machine can query "
              f"the corpus (use --host 127.0.0.1 to keep it local)", file=sys.stderr, flush=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    how = "built" if retriever.built else "loaded from cache"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # SLURM's pre-emption warning reaches every process of the job
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"{prog}: serving {len(retriever)} passages at http://{shown}:{port}/retrieve "
          f"(BM25 index {how} in {time.time() - t0:.1f}s)", flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    print(f"{prog}: stopped", flush=True)
    return 0


# ---------------------------------------------------------------- client


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
                 server: "LocalRetrieverServer | None" = None):
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


# ---------------------------------------------------------------- subprocess


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return "(no log)"


class LocalRetrieverServer:
    """Run `stepopsd-retriever` as a subprocess for the duration of a `with` block.

    Its output goes to `log_path` (a temporary file unless given, removed on a clean exit). A process
    that dies mid-run (killed, crashed) is started again on the same port by `ensure_alive()`, which
    the clients of `client()` call when the server stops answering; at most `max_restarts` times.
    """

    def __init__(self, corpus: str, *, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout: float = 120, topk_max: int = 50, log_path: str | None = None,
                 max_restarts: int = 3):
        self.corpus, self.host, self.port = corpus, host, port
        self.startup_timeout, self.topk_max, self.max_restarts = startup_timeout, topk_max, max_restarts
        self.log_path, self._own_log = log_path, log_path is None
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._lock, self._closed = threading.Lock(), False

    def __enter__(self) -> "LocalRetrieverServer":
        if not os.path.isfile(self.corpus):
            raise FileNotFoundError(f"corpus file not found: {self.corpus}")
        if self._own_log:
            fd, self.log_path = tempfile.mkstemp(prefix="stepopsd-retriever-", suffix=".log")
            os.close(fd)
        self._start("w")
        return self

    def _start(self, log_mode: str) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "stepopsd.envs.search.retrieval", "--corpus", self.corpus,
               "--host", self.host, "--port", str(self.port), "--topk-max", str(self.topk_max)]
        with open(self.log_path, log_mode) as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self._stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"retrieval server exited with code {self.proc.returncode} during startup; "
                                   f"log {self.log_path}:\n{_tail(self.log_path)}")
            if self.url is None:
                m = re.search(r"at (http://\S+)/retrieve", _tail(self.log_path, 50))
                if m:
                    self.url = m.group(1)
            if self.url is not None:
                try:
                    RetrieverClient(self.url, timeout=2.0, retries=0).health()
                    return
                except RetrieverError:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"retrieval server not ready after {self.startup_timeout:.0f}s; "
                           f"log {self.log_path}:\n{_tail(self.log_path)}")

    def ensure_alive(self) -> bool:
        """Start the server again on its port if its process died; True if this call restarted it."""
        with self._lock:
            if self._closed or self.proc is None or self.proc.poll() is None:
                return False
            code = self.proc.returncode
            if self.restarts >= self.max_restarts:
                raise RetrieverUnavailable(f"the run's retriever died (exit code {code}) after {self.restarts} "
                                           f"restarts (max_restarts); log {self.log_path}")
            self.restarts += 1
            log.warning("[retriever] the server process died (exit code %s); starting it again at %s "
                        "(restart %d of at most %d)", code, self.url, self.restarts, self.max_restarts)
            self.port = urllib.parse.urlsplit(self.url).port
            self._start("a")
            return True

    def client(self, **kw) -> RetrieverClient:
        """A client of this server that restarts it when its process died."""
        if self.url is None:
            raise RuntimeError("the retrieval server is not running (use LocalRetrieverServer in a with block)")
        return RetrieverClient(self.url, server=self, **kw)

    def _stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __exit__(self, exc_type, *_) -> None:
        self._closed = True
        self._stop()
        if self._own_log and exc_type is None and self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
