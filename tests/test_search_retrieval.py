"""Search-QA retrieval: BM25 index and cache, the Search-R1 HTTP server, its client, the launcher."""
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepopsd.envs.search.retrieval import (BM25Retriever, LocalRetrieverServer, RetrieverClient,
                                            RetrieverRequestError, RetrieverUnavailable)

from helpers.search_corpus import FACTS, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "wiki-18.jsonl")


@pytest.fixture(scope="module")
def server(corpus):
    with LocalRetrieverServer(corpus, startup_timeout=60) as srv:
        yield srv


def _post(url, body, timeout=10):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def test_bm25_ranks_distinctive_passage_first_in_one_batch(corpus):
    r = BM25Retriever(corpus, cache=False)
    queries = ["who designed the tower clock", "kettlegoat milk cheese", "opera The Lantern Thief",
               "where was Mirra Vantis born"]
    hits = r.search(queries, topk=3)
    assert [h[0].title for h in hits] == ["Ossa Brell", "Kettlegoat", "Ivo Sarrent", "Mirra Vantis"]
    for row in hits:
        assert 1 <= len(row) <= 3
        assert all(p.score is not None and p.score > 0 for p in row)
        assert [p.score for p in row] == sorted((p.score for p in row), reverse=True)


def test_batched_scores_match_bm25s_retrieve(corpus):
    import bm25s
    r = BM25Retriever(corpus, cache=False)
    queries = ["Zorblat clock tower tower", "river sea hills", "copper"]
    ours = r.search(queries, topk=4)
    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    docs, scores = r.index.retrieve(tokens, k=4, show_progress=False)
    for row, d, s in zip(ours, docs.tolist(), scores.tolist()):
        ref = {r.passages[i].id: v for i, v in zip(d, s) if v > 0}
        assert {p.id: pytest.approx(p.score, rel=1e-5) for p in row} == ref


def test_bm25_topk_capped_and_degenerate_queries(corpus):
    r = BM25Retriever(corpus, cache=False)
    assert len(r.search(["Zorblat"], topk=100)[0]) <= len(FACTS)
    assert r.search(["", "the of a", "xyzzy unknownword"], topk=3) == [[], [], []]
    assert r.search([], topk=3) == []


def test_cache_reused_and_rebuilt_when_corpus_changes(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl")
    first = BM25Retriever(path)
    assert first.built and os.path.isfile(os.path.join(path + ".bm25s", "corpus_key.json"))
    second = BM25Retriever(path)
    assert not second.built
    assert second.search(["copper lighthouse"])[0][0].title == "Vellow"
    write_corpus(tmp_path / "c.jsonl", FACTS + [("Brask", "Brask is a copper lighthouse island.")])
    third = BM25Retriever(path)
    assert third.built and len(third) == len(FACTS) + 1
    assert not BM25Retriever(path).built
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_server_answers_raw_search_r1_requests(server):
    with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health == {"status": "ok", "passages": len(FACTS)}

    status, reply = _post(server.url + "/retrieve",
                          {"queries": ["copper lighthouse port river", "amber silt river"], "topk": 2, "return_scores": True})
    assert status == 200 and list(reply) == ["result"] and len(reply["result"]) == 2
    for row in reply["result"]:
        assert len(row) == 2
        for item in row:
            assert set(item) == {"document", "score"} and isinstance(item["score"], float)
            assert set(item["document"]) == {"id", "contents"}
    top = reply["result"][0][0]["document"]
    assert top == {"id": "3", "contents": '"Vellow"\nVellow is a fishing port known for its copper lighthouse.'}

    status, plain = _post(server.url + "/retrieve", {"queries": ["copper lighthouse port river"], "topk": 1, "return_scores": False})
    assert plain == {"result": [[top]]}
    status, default = _post(server.url + "/retrieve", {"queries": ["copper lighthouse port river"], "topk": 1})
    assert default == plain  # Search-R1's default: no scores


@pytest.mark.parametrize("body", [b"not json", {"topk": 3}, {"queries": ["x"], "topk": 0},
                                  {"queries": [1, 2]}, {"queries": ["x"], "topk": 10_000}])
def test_server_bad_request_is_400_with_one_line_error(server, body):
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(server.url + "/retrieve", body)
    assert e.value.code == 400
    err = json.loads(e.value.read())["error"]
    assert err and "\n" not in err


def test_client_against_server(server):
    client = server.client()
    hits = client.search(["Queen Mirra Vantis kingdom", "school of astronomy orrery"], topk=3)
    assert hits[0][0].title == "Quenland" and hits[1][0].id == "9"
    assert hits[0][0].score > 0
    assert client.health()["passages"] == len(FACTS)
    with pytest.raises(RetrieverRequestError, match="400"):
        client.search(["x"], topk=10_000)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_nothing_listening_raises_quickly_naming_url():
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.time()
    with pytest.raises(RetrieverUnavailable) as e:
        RetrieverClient(url, timeout=0.5, retries=1, backoff=0.05).search(["anything"])
    assert time.time() - t0 < 3
    msg = str(e.value)
    assert url in msg and "stepopsd-retriever --corpus" in msg and "\n" not in msg
    assert isinstance(e.value, ConnectionError)


def test_client_slow_server_bounded_retries():
    calls = []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(time.time())
            time.sleep(1.0)
            try:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"result": [[]]}')
            except OSError:
                pass

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/retrieve"
        t0 = time.time()
        with pytest.raises(RetrieverUnavailable, match="after 2 attempts"):
            RetrieverClient(url, timeout=0.2, retries=1, backoff=0.05).search(["q"])
        assert time.time() - t0 < 2 and len(calls) == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_accepts_both_response_shapes():
    from stepopsd.envs.search.retrieval import _passage
    doc = {"id": "7", "contents": '"T"\nbody'}
    assert _passage({"document": doc, "score": 1.5}).score == 1.5
    p = _passage(doc)
    assert (p.id, p.title, p.text, p.score) == ("7", "T", "body", None)


def test_console_script_missing_corpus_one_line_error(tmp_path, console_script):
    missing = str(tmp_path / "nope.jsonl")
    out = subprocess.run([console_script("stepopsd-retriever"), "--corpus", missing, "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "corpus file not found" in lines[0] and missing in lines[0]


def test_local_server_start_failure_shows_log(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    with pytest.raises(RuntimeError, match="not a corpus line"):
        with LocalRetrieverServer(str(bad), startup_timeout=30):
            pass


def test_local_server_stops_cleanly_on_exit(corpus):
    with LocalRetrieverServer(corpus, startup_timeout=60) as srv:
        log = srv.log_path
        assert srv.url.startswith("http://127.0.0.1:")
        assert srv.client().search(["Pellumy tiles"])[0][0].title == "Pellumy"
    assert srv.proc.returncode == 0 and not os.path.exists(log)


def test_the_retrieval_parts_import_downward_only():
    """index (no HTTP) <- server (any retriever) <- client (HTTP only) <- service (composes them): no part imports a
    part above it, and the package re-exports the names the project imports from it."""
    import ast
    import pathlib

    import stepopsd.envs.search.retrieval as retrieval

    folder = pathlib.Path(retrieval.__file__).parent

    def imports(part):
        tree = ast.parse((folder / f"{part}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return {name.split(".")[0] if not name.startswith("stepopsd.") else name for name in names}

    pkg = "stepopsd.envs.search.retrieval."
    assert not {pkg + p for p in ("server", "client", "service")} & imports("index")
    assert not {"http", "urllib", "socket"} & imports("index")
    assert not {pkg + p for p in ("index", "client", "service")} & imports("server")
    assert not {pkg + p for p in ("index", "service")} & imports("client")
    for name in ("BM25Retriever", "Limits", "LocalRetrieverServer", "RetrieverClient", "RetrieverError",
                 "RetrieverProtocolError", "RetrieverRequestError", "RetrieverUnavailable", "check_retriever", "main",
                 "make_server", "_passage"):
        assert hasattr(retrieval, name), name
