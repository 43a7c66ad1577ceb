"""Serving benchmark: `artsim serve` over HTTP vs the same queries through ShardedIndex in-process.

    .venv/bin/python benchmarks/bench_serve.py --n 1000000 --dim 256      # the issue's size (needs ~3 GiB)
    .venv/bin/python benchmarks/bench_serve.py --n 200000 --dim 256       # what a 2-core dev box runs in minutes
    .venv/bin/python benchmarks/bench_serve.py --index-kind ivf           # the IVF path (what N > 1M gets)
    .venv/bin/python benchmarks/bench_serve.py --index URI --where collection=c1   # any existing index

Steps:
1. build: N clustered unit vectors with synthetic facets (artsim.testing.index_data), indexed by `run_index` on a local
   Ray (default index choice for N: Flat up to 1M vectors); reused from benchmarks/out/serve/ when present;
2. in-process: for 1 / 4 / 16 concurrent callers (threads), the same query mix through ShardedIndex:
   id (`search_ids`), vector (`search`) and conditional (`search_ids` with ``culture=China``, 1/8 of the works);
3. HTTP: `artsim serve` in its own process, the same queries from 1 / 4 / 16 client *processes* (persistent
   HTTP/1.1 connections; processes, so the load generator's GIL does not throttle the server);
4. scaling: does the server use more cores for more concurrent requests (no global lock around search)? One query
   must then use one core, so this step builds (or reuses) the same vectors as ONE shard and starts the server with
   OMP_NUM_THREADS=1 (a FAISS search then runs on the calling thread; otherwise one exact search already uses every
   core, and the 2 shards of the main index are searched in parallel threads): server --threads 1, 2, ... up to the
   core count under 4 clients, id queries; queries/s should grow with the threads up to the cores.

Printed side by side: queries/s, p50 and p99 latency per kind and concurrency, and the HTTP overhead at p50
(HTTP p50 - in-process p50, 1 client). Clients and server share the machine's cores, so at high concurrency the
HTTP numbers include the load generator's own CPU use.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ProcessPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
KINDS = ("id", "vector", "conditional")


def build(out: str, n: int, dim: int, kind: str = "exact", shards: int = 2) -> str:
    """The benchmark index (reused when present). ``kind`` exact: the default choice for N <= 1M (Flat); ivf: the
    path N > 1M gets (IVF + quantiser, nprobe tuned at build)."""
    root = os.path.join(out, f"run-{n}x{dim}" + ("" if kind == "exact" else f"-{kind}") +
                        ("" if shards == 2 else f"-{shards}shard"))
    index_uri = os.path.join(root, "index", "bench")
    if os.path.exists(os.path.join(index_uri, "manifest.json")):
        print(f"build: reusing {index_uri}", flush=True)
        return index_uri
    import ray

    from artsim.config import config_from_dict
    from artsim.index.stage import run_index
    from artsim.testing.index_data import clustered_vectors, object_ids_for, write_run
    from artsim.runtime import RunContext

    t = time.perf_counter()
    index_cfg = {"embeddings": "bench", "name": "bench", "num_shards": shards}
    if kind == "ivf":
        index_cfg["exact_max_vectors"] = 1
    ctx = RunContext(config_from_dict({"run": {"root": root}, "index": index_cfg}))
    write_run(ctx.storage, ctx.paths, object_ids_for(n), clustered_vectors(n, dim, n_clusters=max(100, n // 1000)),
              model_key="bench")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    run_index(ctx)
    ray.shutdown()
    print(f"build: {n} x {dim} in {time.perf_counter() - t:.0f} s", flush=True)
    return index_uri


def queries(index_uri: str, count: int, seed: int = 0) -> dict:
    from artsim.serving import ShardedIndex

    index = ShardedIndex.open(index_uri)
    rng = np.random.default_rng(seed)
    ids = [index.object_ids()[i] for i in rng.integers(0, index.ntotal, count)]
    vectors = index.vectors_for_ids(ids) + rng.standard_normal((count, index.dim)).astype(np.float32) * 0.01
    index.close()
    return {"ids": ids, "vectors": vectors.tolist()}


def _stats(latencies: list[float], wall: float) -> dict:
    lat = np.array(latencies) * 1000
    return {"qps": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3)}


def parse_where(text: str) -> dict:
    from artsim.serving.filters import parse_where as parse

    return parse([text])


def in_process(index_uri: str, qs: dict, clients: int, per_client: int, k: int, where: str = "culture=China") -> dict:
    from artsim.serving import ShardedIndex

    index = ShardedIndex.open(index_uri)
    where_filter = parse_where(where)
    out = {}
    for kind in KINDS:
        def one(i):
            if kind == "id":
                index.search_ids([qs["ids"][i]], k)
            elif kind == "vector":
                index.search(np.asarray(qs["vectors"][i], np.float32), k)
            else:
                index.search_ids([qs["ids"][i]], k, where=where_filter)

        one(0)  # warm: filter subsets, caches
        latencies, lock = [], threading.Lock()

        def worker(c):
            mine = []
            for j in range(per_client):
                t = time.perf_counter()
                one((c * per_client + j) % len(qs["ids"]))
                mine.append(time.perf_counter() - t)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[kind] = _stats(latencies, time.perf_counter() - t0)
    index.close()
    return out


def _http_client(args) -> tuple[list[float], float, float]:
    port, kind, qs, start, count, k, barrier_time, where, name = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while time.time() < barrier_time:  # all clients start together
        time.sleep(0.001)
    latencies = []
    began = time.time()
    for j in range(count):
        i = (start + j) % len(qs["ids"])
        t = time.perf_counter()
        if kind == "vector":
            conn.request("POST", f"/v1/{name}/neighbors?k={k}", body=json.dumps({"vector": qs["vectors"][i]}),
                         headers={"Content-Type": "application/json"})
        else:
            query = f"&where={urllib.parse.quote(where)}" if kind == "conditional" else ""
            conn.request("GET", f"/v1/{name}/neighbors?id={urllib.parse.quote(qs['ids'][i])}&k={k}{query}")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        latencies.append(time.perf_counter() - t)
    conn.close()
    return latencies, began, time.time()


def start_server(index_uri: str, threads: int, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "artsim.cli", "serve", "--index", index_uri, "--port", str(port),
                             "--poll-seconds", "0", "--threads", str(threads), "--log-level", "warning"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **(env or {})))
    deadline = time.monotonic() + 600
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("artsim serve did not start")
        time.sleep(0.2)


def http_run(port: int, qs: dict, clients: int, per_client: int, k: int, kinds=KINDS, where: str = "culture=China",
             name: str = "bench") -> dict:
    out = {}
    with ProcessPoolExecutor(max_workers=clients) as pool:
        for kind in kinds:
            _http_client((port, kind, qs, 0, 2, k, 0, where, name))  # warm
            start_at = time.time() + 1.0  # every client process is up and connected by then
            parts = list(pool.map(_http_client, [(port, kind, qs, c * per_client, per_client, k, start_at, where,
                                                  name) for c in range(clients)]))
            span = max(p[2] for p in parts) - min(p[1] for p in parts)  # first request to last answer
            out[kind] = _stats([x for p in parts for x in p[0]], span)
    return out


def server_memory(index_uri: str, qs: dict, k: int, name: str = "bench") -> dict:
    """PSS / RSS of a serving process after 500 id queries; per million vectors (shards are mmapped: their pages
    count in RSS once touched, and in PSS split between the processes that map them)."""
    from artsim.serving import ShardedIndex

    index = ShardedIndex.open(index_uri)
    n, shard_bytes = index.ntotal, sum(s["bytes"] for s in index.manifest["shards"])
    ids_bytes = index.manifest["ids_bytes"]
    index.close()
    proc, port = start_server(index_uri, 8)
    try:
        _http_client((port, "id", qs, 0, 500, k, 0, "", name))
        fields = {}
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts[0] in ("Rss:", "Pss:", "Pss_Anon:", "Pss_File:"):
                    fields[parts[0][:-1].lower()] = int(parts[1]) / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    per_million = {f"{key}_mib_per_million": round(v * 1e6 / n, 1) for key, v in fields.items()}
    return {"vectors": n, "shard_mib": round(shard_bytes / 2 ** 20, 1), "ids_mib": round(ids_bytes / 2 ** 20, 1),
            **{f"{key}_mib": round(v, 1) for key, v in fields.items()}, **per_million}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--per-client", type=int, default=200, help="queries per client and kind")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "serve"))
    p.add_argument("--memory-only", action="store_true", help="only measure the serving process's memory")
    p.add_argument("--index-kind", choices=["exact", "ivf"], default="exact",
                   help="exact: Flat (artsim's choice up to 1M vectors); ivf: the IVF path N > 1M gets")
    p.add_argument("--index", default=None, help="serve this existing index instead of building one (no scaling step)")
    p.add_argument("--where", default="culture=China", help="the conditional queries' filter")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]
    os.makedirs(args.out, exist_ok=True)
    index_uri = args.index or build(args.out, args.n, args.dim, args.index_kind)
    name = index_uri.rstrip("/").rsplit("/", 1)[-1]
    qs = queries(index_uri, 2000)
    if args.memory_only:
        print(json.dumps(server_memory(index_uri, qs, args.k, name)))
        return
    from artsim.serving import ShardedIndex

    index = ShardedIndex.open(index_uri)
    n, dim, factory = index.ntotal, index.dim, index.manifest["factory"]
    index.close()
    report = {"n": n, "dim": dim, "index": index_uri, "factory": factory, "where": args.where,
              "cpus": os.cpu_count(), "k": args.k, "in_process": {}, "http": {}, "scaling": {}}
    for c in clients_list:
        report["in_process"][c] = in_process(index_uri, qs, c, args.per_client, args.k, args.where)
        print(f"in-process, {c} callers: {report['in_process'][c]}", flush=True)
    default_threads = max(8, 4 * (os.cpu_count() or 1))
    proc, port = start_server(index_uri, default_threads)
    try:
        for c in clients_list:
            report["http"][c] = http_run(port, qs, c, args.per_client, args.k, where=args.where, name=name)
            print(f"http, {c} clients: {report['http'][c]}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if not (args.index or args.skip_scaling):
        one_shard = build(args.out, args.n, args.dim, args.index_kind, shards=1)
        report["scaling_index"] = one_shard
        for threads in range(1, (os.cpu_count() or 1) + 1):
            proc, port = start_server(one_shard, threads, env={"OMP_NUM_THREADS": "1"})
            try:
                report["scaling"][threads] = http_run(port, qs, 4, args.per_client, args.k, kinds=("id",))["id"]
                print(f"http, one shard, OMP_NUM_THREADS=1, server --threads {threads}, 4 clients: "
                      f"{report['scaling'][threads]}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    report["memory"] = server_memory(index_uri, qs, args.k, name)
    print(f"memory: {report['memory']}", flush=True)
    out_file = os.path.join(args.out, f"results-{n}x{dim}-{factory.replace(',', '_')}.json")
    with open(out_file, "w") as f:
        json.dump(report, f, indent=2)
    print_report(report)
    print(f"results: {out_file}")


def print_report(r: dict) -> None:
    from artsim.console import table

    print(f"\n{r['n']} x {r['dim']} vectors, {r.get('factory')}, k={r['k']}, conditional: {r.get('where')}, "
          f"{r['cpus']} CPUs (clients and server share them)")
    rows = []
    for c in r["http"]:
        for kind in KINDS:
            a, b = r["in_process"][c][kind], r["http"][c][kind]
            rows.append([kind, c, a["qps"], b["qps"], f"{b['qps'] / a['qps']:.2f}x", a["p50_ms"], b["p50_ms"],
                         round(b["p50_ms"] - a["p50_ms"], 3), a["p99_ms"], b["p99_ms"]])
    table(["query", "clients", "in-process q/s", "HTTP q/s", "HTTP/in-process", "in-process p50 ms",
           "HTTP p50 ms", "HTTP adds (p50 ms)", "in-process p99 ms", "HTTP p99 ms"], rows)
    if r["scaling"]:
        base = r["scaling"][min(r["scaling"])]["qps"]
        print("scaling (one shard, OMP_NUM_THREADS=1, id queries, 4 clients): " + ", ".join(
            f"--threads {t}: {s['qps']} q/s ({s['qps'] / base:.2f}x)" for t, s in r["scaling"].items()))


if __name__ == "__main__":
    main()
