"""The retrieval service: the `stepopsd-retriever` command and the server a run starts for itself.

- `main` (`stepopsd-retriever --corpus FILE [--host H] [--port N]`, also `python -m stepopsd.envs.search.retrieval`)
  builds the index (`index.BM25Retriever`) and serves it (`server.make_server`). It listens on loopback unless
  `--host` says otherwise (then it warns).
- `LocalRetrieverServer(corpus)`: a context manager that runs that command as a subprocess (used when the
  training config asks the project to start its own retriever); its clients (`client.RetrieverClient`) restart
  it on the same port when its process died.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Sequence

from stepopsd.envs.search.retrieval.client import RetrieverClient, RetrieverError, RetrieverUnavailable
from stepopsd.envs.search.retrieval.index import BM25Retriever
from stepopsd.envs.search.retrieval.server import Limits, loopback, make_server

log = logging.getLogger(__name__)


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
    if not loopback(host):
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
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
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
