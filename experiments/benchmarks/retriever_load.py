"""Load and endurance on GENERATED data: the BM25 retriever server under concurrent clients, and the ALFWorld
worker pool over many resets (issue 12, item 4).

    python experiments/benchmarks/retriever_load.py [--part server|pool|both] [--seconds 60] [--clients 64]
        [--batch 128] [--resets 1000] [--slots 64] [--minutes 10] [--games DIR]

Server: `make_qa` writes a generated corpus (`--entities` 20,000: ~30,700 fictional passages) and its questions;
`LocalRetrieverServer` serves it (`stepopsd-retriever`, default limits). `--clients` client threads, spread
over `--procs` processes so the clients' JSON work does not share one interpreter lock, each send batches of
`--batch` generated questions (topk 3) back to back for `--seconds`, through `RetrieverClient(retries=0)`, so
every failure counts. A reply must hold one result list per query, and each client's first reply must equal
the in-process BM25 result for its queries (no replies mixed up between concurrent requests). Reports
requests, failed, lost (sent but never answered), p50/p99 latency, queries/s, and the server's RSS.

Pool: `AlfWorldEnv` (`EnvWorkerPool` over the real `AlfWorldEngine`) resets `--slots` slots (tasks x group 8),
cycling through the train games of `--games` (default: generate heat games), up to `--resets` times or until
`--minutes` have passed, whichever comes first. RSS of the parent and of each worker (/proc) after the first
reset and every tenth of the way; failed slots and worker restarts.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

from stepopsd.envs.search.retrieval import BM25Retriever, LocalRetrieverServer, RetrieverClient


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _client_process(url: str, questions: list[str], threads: int, batch: int, end: float, seed: int) -> dict:
    """`threads` clients sending batches until wall-clock time `end`; their latencies, errors and first replies."""
    out = {"sent": 0, "latencies": [], "errors": [], "first": []}
    lock = threading.Lock()

    def client(i: int) -> None:
        rng, c, first = random.Random(seed * 1000 + i), RetrieverClient(url, timeout=120, retries=0), None
        while time.time() < end:
            queries = rng.sample(questions, batch)
            with lock:
                out["sent"] += 1
            t0 = time.perf_counter()
            try:
                hits = c.search(queries, topk=3)
                if len(hits) != batch:
                    raise RuntimeError(f"{len(hits)} result lists for {batch} queries")
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    out["errors"].append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                out["latencies"].append(time.perf_counter() - t0)
            if first is None:
                first = (queries, [[p.id for p in row] for row in hits])
                with lock:
                    out["first"].append(first)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=max(0.0, end - time.time()) + 180)  # a request hung past this counts as lost
    return out


def server_part(a) -> dict:
    from stepopsd.envs.search.data import load_questions
    from stepopsd.envs.search.generate import make_qa

    tmp = tempfile.mkdtemp(prefix="retriever-load-")
    report = make_qa(tmp, seed=a.seed, num_entities=a.entities, train_questions=a.entities // 4, test_questions=a.entities // 20)
    questions = [t.question for split in ("train", "test") for t in load_questions(tmp, split)]
    corpus = os.path.join(tmp, "corpus.jsonl")
    reference = BM25Retriever(corpus)  # builds the index cache the server then loads
    procs = min(a.procs, a.clients)
    per = [a.clients // procs + (i < a.clients % procs) for i in range(procs)]
    with LocalRetrieverServer(corpus, startup_timeout=300) as srv:
        RetrieverClient(srv.url).search(questions[:a.batch])  # warm-up
        rss = [rss_mb(srv.proc.pid)]
        start = time.time()
        end = start + a.seconds

        def sample():  # at each quarter of the sending time
            for _ in range(4):
                time.sleep(a.seconds / 4)
                rss.append(rss_mb(srv.proc.pid))

        threading.Thread(target=sample, daemon=True).start()
        with mp.get_context("fork").Pool(procs) as pool:
            parts = pool.starmap(_client_process, [(srv.url, questions, n, a.batch, end, a.seed + i) for i, n in enumerate(per)])
        wall = time.time() - start
        alive = srv.proc.poll() is None
    lat = sorted(x for p in parts for x in p["latencies"])
    errors = [e for p in parts for e in p["errors"]]
    sent = sum(p["sent"] for p in parts)
    firsts = [f for p in parts for f in p["first"]]
    mismatched = sum([[h.id for h in row] for row in reference.search(q, 3)] != ids for q, ids in firsts)
    return {"passages": report.passages, "sent": sent, "ok": len(lat), "failed": len(errors), "lost": sent - len(lat) - len(errors),
            "errors": errors[:3], "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "qps": len(lat) * a.batch / wall, "wall_s": wall, "checked": len(firsts), "mismatched": mismatched,
            "rss": rss, "alive": alive}


def pool_part(a) -> dict:
    from stepopsd.envs.alfworld.env import AlfWorldEnv, load_tasks

    games = a.games
    if not games:
        from stepopsd.envs.alfworld.generate import make_games

        games = tempfile.mkdtemp(prefix="retriever-load-games-")
        make_games(games, seed=a.seed, train_per_type=a.train_games, valid_per_type=0, task_types=["heat"],
                   workers=a.workers, log=lambda *_: None)
    tasks = load_tasks(games, "train")
    group = 8
    per_reset = a.slots // group
    rows, failed, t0 = [], 0, time.perf_counter()
    with AlfWorldEnv(num_workers=a.workers) as env:
        for i in range(a.resets):
            picked = [tasks[(i * per_reset + k) % len(tasks)] for k in range(per_reset)]
            failed += sum(s.failed for s in env.reset(picked, group))
            done, elapsed = i + 1, time.perf_counter() - t0
            last = done == a.resets or elapsed > 60 * a.minutes
            if not rows or last or done % max(1, a.resets // 10) == 0 or elapsed - rows[-1][1] > 6 * a.minutes:
                rows.append((done, elapsed, rss_mb(os.getpid()), [rss_mb(p) for p in env.pool.worker_pids]))
            if last:
                break
        restarts = env.pool.worker_restarts
    return {"games": len(tasks), "data": games, "rows": rows, "failed": failed, "restarts": restarts,
            "slots": per_reset * group}


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["server", "pool", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=60, help="server part: how long the clients send")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--procs", type=int, default=4, help="client processes the client threads are spread over")
    ap.add_argument("--batch", type=int, default=128, help="queries per request")
    ap.add_argument("--entities", type=int, default=20_000, help="size of the generated knowledge base")
    ap.add_argument("--resets", type=int, default=1000, help="pool part: resets to run (at most)")
    ap.add_argument("--minutes", type=float, default=10, help="pool part: stop after this long")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--games", help="generated games (stepopsd-make-games --out DIR); default: generate heat games")
    ap.add_argument("--train-games", type=int, default=16, help="heat train games to generate without --games")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"Machine: {_machine()}. Commit {commit}. Command: `python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}`\n")
    ok = True
    # the pool first: the server part loads a BM25 index in this process, which would count in the parent's RSS
    if a.part in ("pool", "both"):
        p = pool_part(a)
        ok &= p["failed"] == p["restarts"] == 0
        done = p["rows"][-1][0]
        print(f"Pool: {p['slots']} slots (tasks x group 8) on {a.workers} workers, cycling through {p['games']} GENERATED train games; "
              f"{done} of {a.resets} resets asked" + (f" (stopped at the {a.minutes:g}-minute limit)" if done < a.resets else "")
              + f"; {p['failed']} failed slots, {p['restarts']} worker restarts.\n")
        print("| resets done | elapsed (s) | parent RSS (MB) | worker RSS (MB) |")
        print("| --- | --- | --- | --- |")
        for n, el, parent, workers in p["rows"]:
            print(f"| {n} | {el:.0f} | {parent:.0f} | {' / '.join(f'{w:.0f}' for w in workers)} |")
        print()
    if a.part in ("server", "both"):
        s = server_part(a)
        ok &= s["failed"] == s["lost"] == s["mismatched"] == 0 and s["alive"]
        print(f"Server: GENERATED corpus of {s['passages']:,} passages, {a.clients} clients in {min(a.procs, a.clients)} processes, "
              f"batches of {a.batch} queries, topk 3, {s['wall_s']:.0f} s.\n")
        print("| requests | failed | lost | p50 latency (ms) | p99 latency (ms) | queries/s | first replies = in-process | server RSS, start and each quarter (MB) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {s['sent']:,} | {s['failed']} | {s['lost']} | {s['p50_ms']:,.0f} | {s['p99_ms']:,.0f} | {s['qps']:,.0f} | "
              f"{s['checked'] - s['mismatched']}/{s['checked']} | {' / '.join(f'{r:.0f}' for r in s['rss'])} |\n")
        for e in s["errors"]:
            print(f"  error: {e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
