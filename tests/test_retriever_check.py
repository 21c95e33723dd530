"""check_retriever: one real probe request before a run's expensive work, one-line UserErrors when the
retriever is not there or is not a Search-R1 retriever. Every server here is a real local HTTP server."""
import http.server
import socket
import threading
import time

import pytest

from stepopsd.envs.search.retrieval import (LocalRetrieverServer, RetrieverClient, RetrieverError,
                                            RetrieverProtocolError, RetrieverUnavailable, check_retriever)
from stepopsd.errors import UserError

from helpers.search_corpus import write_corpus


def _one_line_user_error(excinfo, *words):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError) and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("url", ["localhost:8000/retrieve", "127.0.0.1:8000", "ftp://127.0.0.1/retrieve", "http://",
                                 "http://127.0.0.1:port/retrieve", "", None])
def test_malformed_url(url):
    with pytest.raises(RetrieverError) as e:
        check_retriever(url, timeout=1)
    _one_line_user_error(e, "is malformed", "http://HOST:PORT/retrieve", "env.retriever.url")
    with pytest.raises(RetrieverError):  # the client itself refuses it too (env_factory builds one)
        RetrieverClient(url)


def test_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(RetrieverUnavailable) as e:
        check_retriever(f"http://127.0.0.1:{port}/retrieve", timeout=2)
    assert time.time() - t0 < 2
    _one_line_user_error(e, "connection refused", f"stepopsd-retriever --corpus FILE --port {port}",
                         "env.retriever.start_server=true")


def test_host_does_not_resolve():
    with pytest.raises(RetrieverUnavailable) as e:
        check_retriever("http://no-such-retriever-host.invalid:8000/retrieve", timeout=2)
    _one_line_user_error(e, "'no-such-retriever-host.invalid' does not resolve", "fix the host in env.retriever.url")


class AnotherAPI(http.server.BaseHTTPRequestHandler):
    """A JSON service of another kind: /retrieve is 404, /search answers what `ANSWERS[path]` says."""
    ANSWERS = {"/api/html": (200, "text/html", b"<html><body>hello</body></html>"),
               "/api/status": (200, "application/json", b'{"status": "ok"}'),
               "/api/string-result": (200, "application/json", b'{"result": "three documents"}'),
               "/api/short-result": (200, "application/json", b'{"result": []}'),
               "/api/flat-result": (200, "application/json", b'{"result": [{"id": "1", "contents": "x"}]}'),
               "/api/bad-items": (200, "application/json", b'{"result": [["just a string"]]}')}

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        prefix = self.path.rsplit("/", 1)[0]
        code, kind, body = self.ANSWERS.get(prefix, (404, "application/json", b'{"detail": "Not Found"}'))
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def other_api():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnotherAPI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("path, words", [
    ("/retrieve", "HTTP 404"),
    ("/api/html/retrieve", "not JSON"),
    ("/api/status/retrieve", "without a 'result' list of 1 lists"),
    ("/api/string-result/retrieve", "without a 'result' list"),
    ("/api/short-result/retrieve", "without a 'result' list"),
    ("/api/flat-result/retrieve", "without a 'result' list"),
    ("/api/bad-items/retrieve", "unexpected retrieval result item"),
])
def test_server_of_another_api(other_api, path, words):
    with pytest.raises(RetrieverProtocolError) as e:
        check_retriever(other_api + path, timeout=2)
    _one_line_user_error(e, words, "env.retriever.url")


def test_static_file_server_without_post(tmp_path):
    """python -m http.server answers POST with 501: not a retriever, and not worth retrying."""
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RetrieverProtocolError) as e:
            check_retriever(f"http://127.0.0.1:{srv.server_address[1]}/retrieve", timeout=2)
        _one_line_user_error(e, "HTTP 501", "another API")
    finally:
        srv.shutdown()
        srv.server_close()


def test_real_retriever_passes(tmp_path):
    with LocalRetrieverServer(write_corpus(tmp_path / "c.jsonl"), startup_timeout=60) as srv:
        assert check_retriever(srv.url + "/retrieve", timeout=5) is None
        assert check_retriever(srv.url, timeout=5) is None


def test_main_guard_prints_the_one_line(capsys):
    from stepopsd.errors import main_guard

    with pytest.raises(SystemExit) as e, main_guard("train.py"):
        check_retriever("localhost:8000", timeout=1)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: retriever URL")
