"""The retrieval server under bad input: limits, malformed requests, stalled clients, the bind address;
the model's text reaches the server only as the JSON body."""
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepopsd.envs.search.env import SearchEnv
from stepopsd.envs.search.retrieval import BM25Retriever, Limits, LocalRetrieverServer, RetrieverClient, make_server
from stepopsd.types import Task

from helpers.search_corpus import write_corpus

LIMITS = Limits(max_queries=4, max_query_chars=50, topk_max=5, max_body_bytes=200_000, read_timeout=1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "wiki-18.jsonl")


@pytest.fixture(scope="module")
def port(corpus):
    """The real server (make_server, what `stepopsd-retriever` serves) with small limits, in a thread."""
    srv = make_server(BM25Retriever(corpus, cache=False), "127.0.0.1", 0, LIMITS)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _request(port, body: bytes | None, headers: dict, path="/retrieve"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _post(port, obj) -> tuple[int, dict]:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return _request(port, body, {"Content-Type": "application/json", "Content-Length": str(len(body))})


def _serves_good_requests(port):
    status, reply = _post(port, {"queries": ["copper lighthouse"], "topk": 1})
    assert status == 200 and reply["result"][0][0]["id"] == "3"


@pytest.mark.parametrize("body, code, words", [
    ({"queries": ["Zorblat"] * 5}, 400, "5 queries in one request, above this server's limit 4"),
    ({"queries": ["ok", "a" * 51]}, 400, "a query of 51 characters, above this server's limit 50"),
    ({"queries": ["x"], "topk": 0}, 400, '"topk" must be an integer >= 1'),
    ({"queries": ["x"], "topk": 6}, 400, "above this server's limit 5"),
    ({"queries": ["x"], "topk": "3"}, 400, '"topk" must be an integer'),
    ({"queries": ["x"], "topk": True}, 400, '"topk" must be an integer'),
    (b"not json", 400, "not JSON"),
    (b"\xff\xfe\x00garbage", 400, "not JSON"),
    (b"[" * 100_000, 400, "not JSON"),  # nesting deep enough to exhaust the JSON decoder's recursion
    ([1, 2], 400, "a JSON object"),
    ({"topk": 3}, 400, "a JSON object"),
    ({"queries": [1, 2]}, 400, "list of strings"),
    ({"queries": {"q": "x"}}, 400, "list of strings"),
])
def test_bad_request_is_4xx_one_line_then_serves(port, body, code, words):
    status, reply = _post(port, body)
    assert status == code and words in reply["error"] and "\n" not in reply["error"]
    _serves_good_requests(port)


@pytest.mark.parametrize("headers, code, words", [
    ({}, 411, "Content-Length header is required"),
    ({"Transfer-Encoding": "chunked"}, 411, "Content-Length header is required"),
    ({"Content-Length": "abc"}, 400, "bad Content-Length"),
    ({"Content-Length": "-5"}, 400, "bad Content-Length"),
    ({"Content-Length": str(10 ** 12)}, 413, "above this server's limit 200000 (--max-body-bytes)"),
])
def test_body_length_checked_before_reading(port, headers, code, words):
    t0 = time.time()
    status, reply = _request(port, None, headers)  # no body sent: the server must answer from the headers
    assert status == code and words in reply["error"] and time.time() - t0 < 2
    _serves_good_requests(port)


def test_stalled_client_is_dropped_and_others_served(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"queries\"")
        _serves_good_requests(port)  # while that request waits for its body
        t0 = time.time()
        assert s.recv(1000) == b""  # closed after the read timeout (1 s), no reply to a half request
        assert time.time() - t0 < 3
    _serves_good_requests(port)


def test_many_bad_requests_leave_server_working(port):
    for i in range(50):
        _post(port, b"{" * (i + 1))
    _serves_good_requests(port)


def test_binds_loopback_by_default_and_warns_otherwise(corpus):
    with LocalRetrieverServer(corpus, startup_timeout=60) as srv:
        log = open(srv.log_path).read()
        assert srv.url.startswith("http://127.0.0.1:") and "warning" not in log
    with LocalRetrieverServer(corpus, host="0.0.0.0", startup_timeout=60) as srv:
        lines = [line for line in open(srv.log_path).read().splitlines() if "warning" in line]
        assert len(lines) == 1 and "listening on 0.0.0.0, not loopback" in lines[0] and "--host 127.0.0.1" in lines[0]


def test_client_splits_big_batches_and_cuts_long_queries(port):
    client = RetrieverClient(f"http://127.0.0.1:{port}", max_batch=LIMITS.max_queries, max_query_chars=50)
    hits = client.search(["copper lighthouse"] * 9 + ["kettlegoat " * 20], topk=1)  # 3 requests, the last cut
    assert len(hits) == 10 and {h[0].id for h in hits[:9]} == {"3"} and hits[9][0].title == "Kettlegoat"


def test_model_text_goes_only_into_the_json_body():
    seen = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["queries"]))
            data = json.dumps({"result": [[] for _ in body["queries"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = SearchEnv(RetrieverClient(f"http://127.0.0.1:{srv.server_address[1]}/retrieve"))
        env.reset([Task("t/0", "gen", "q.parquet", "test", True, "Who?", ("x",))], 2)
        nasty = ["../../etc/passwd?x=1#y /health", "$(rm -rf /); `id` http://evil.example/ %2e%2e"]
        out = env.step({i: f"<search>{q}</search>" for i, q in enumerate(nasty)})
        assert not any(t.state.failed for t in out.values())
        assert seen == [("/retrieve", nasty)]
    finally:
        srv.shutdown()
        srv.server_close()
