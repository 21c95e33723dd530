"""Search-QA retrieval in parts: a BM25 index, a Search-R1-compatible HTTP server, its client, and the service.

- `index`: `BM25Retriever(corpus)`, BM25 over a `wiki-18.jsonl`-format corpus, cached in `<corpus>.bm25s/`.
- `server`: `make_server(retriever, ...)` answers the Search-R1 retrieval API (`POST /retrieve`, `GET /health`)
  within its `Limits`; standard library only.
- `client`: `RetrieverClient(url)` with bounded retries, `check_retriever(url)`, and the one-line
  `RetrieverError`s a user can fix.
- `service`: `main` (the `stepopsd-retriever` command: index + server) and `LocalRetrieverServer(corpus)`, the
  server a run starts for itself as a subprocess and restarts when it dies.

The layers import downward only: the index knows nothing of HTTP, the server serves any retriever, the client
knows nothing of the index, the service composes them. Every name is re-exported here, so
`from stepopsd.envs.search.retrieval import ...` and `python -m stepopsd.envs.search.retrieval` work as before.
"""
from stepopsd.envs.search.retrieval.client import (RestartableServer, RetrieverClient, RetrieverError,
                                                   RetrieverProtocolError, RetrieverRequestError, RetrieverUnavailable,
                                                   check_retriever)
from stepopsd.envs.search.retrieval.client import _passage  # noqa: F401  (private: read by its tests)
from stepopsd.envs.search.retrieval.index import INDEX_FORMAT, STOPWORDS, BM25Retriever
from stepopsd.envs.search.retrieval.server import Limits, Searcher, loopback, make_server
from stepopsd.envs.search.retrieval.service import LocalRetrieverServer, main

__all__ = ["BM25Retriever", "INDEX_FORMAT", "Limits", "LocalRetrieverServer", "RestartableServer", "RetrieverClient",
           "RetrieverError", "RetrieverProtocolError", "RetrieverRequestError", "RetrieverUnavailable", "STOPWORDS",
           "Searcher", "check_retriever", "loopback", "main", "make_server"]
