"""CPU per request of the fetch path *around* the image work: URL and address checks, robots verdict, limiter
leases, keep-alive pool, deadline watchdog, HTTP request and response parsing, body read, sha256.

One process, one :class:`~artsim.download.fetch.Fetcher` with the in-process limiter and ``--threads`` threads (as in
a shard worker), against the loopback benchmark server (tests/httpd.py, its own process, HTTP/1.1 keep-alive)
serving a tiny JPEG (64 px, ~1 KB), so decode/resize/encode cost next to nothing and what is measured is the
per-request overhead that bench_download.py's CPU per image carries on top of the image work. CPU is this
process's (all threads: ``time.process_time``); the server's is not counted.

    .venv/bin/python benchmarks/bench_fetch_overhead.py [--n 4000] [--threads 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    from PIL import Image

    from artsim.config import DownloadConfig
    from artsim.download.fetch import Fetcher
    from artsim.download.politeness import LocalHostLimiter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        buf = io.BytesIO()
        Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "JPEG", quality=90)
        (work / "tiny.jpg").write_bytes(buf.getvalue())
        spec = {"latency_s": 0.0, "keep_alive": True,
                "files": {f"/img/{i:05d}.jpg": str(work / "tiny.jpg") for i in range(args.n)}}
        (work / "spec.json").write_text(json.dumps(spec))
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "httpd.py"), "--spec", str(work / "spec.json"),
                                   "--port-file", str(work / "port")])
        try:
            deadline = time.time() + 60
            while not (work / "port").exists():
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
            port = int((work / "port").read_text())
            urls = [f"http://127.0.0.1:{port}/img/{i:05d}.jpg" for i in range(args.n)]
            cfg = DownloadConfig(allow_hosts=["127.0.0.1"], per_host_connections=args.connections,
                                 per_host_requests_per_second=None, image_size=384)
            per_request = []
            for rep in range(args.repeats + 1):  # the first round warms up (robots.txt, DNS, imports)
                limiter = LocalHostLimiter(cfg.per_host_connections, None, cfg.circuit_breaker_failures)
                fetcher = Fetcher(cfg, limiter, seed=0)
                cpu0, t0 = time.process_time(), time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    statuses = list(pool.map(lambda u: fetcher.fetch_url("x", u).status, urls))
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                fetcher.release_connections()
                ok = statuses.count("ok")
                if ok != len(urls):
                    raise RuntimeError(f"only {ok}/{len(urls)} ok: {set(statuses)}")
                if rep:
                    per_request.append(1e6 * cpu / ok)
                    print(f"round {rep}: {ok} requests, {1e6 * cpu / ok:.0f} µs CPU/request, {ok / wall:.0f} "
                          f"requests/s, {fetcher.pool.opened} connections opened")
        finally:
            server.terminate()
            server.wait()
    per_request.sort()
    print(f"median {per_request[len(per_request) // 2]:.0f} µs CPU per request (min {per_request[0]:.0f}); "
          f"load average {tuple(round(x, 1) for x in __import__('os').getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
