"""`artsim serve --index URI [--index URI ...] [--host 127.0.0.1] [--port 8000]` (uvicorn, one process)."""
from __future__ import annotations

import argparse
import logging

from artsim.errors import ArtsimError

log = logging.getLogger("artsim.serve")


def serve_parser() -> argparse.ArgumentParser:
    from artsim.command import OneLineParser

    p = OneLineParser(prog="artsim serve", description="Serve artsim indexes over HTTP (docs/serve.md).")
    p.add_argument("--index", dest="indexes", action="append", required=True, metavar="URI",
                   help="URI of index/<name>/ (local, file:// or s3://); repeatable; served at /v1/<name>/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll-seconds", type=float, default=60.0,
                   help="how often to look for a new manifest.json under each URI (0: never reload)")
    p.add_argument("--retry-refused-seconds", type=float, default=None,
                   help="wait before trying a refused (corrupt) version again (default: 10 x --poll-seconds)")
    p.add_argument("--cache-dir", default=None,
                   help="local copies of S3 indexes (default ~/.cache/artsim/index); local indexes are read in "
                        "place unless this is set")
    p.add_argument("--threads", type=int, default=None,
                   help="worker threads for searches and image embedding (default: 4 x CPUs, at least 8)")
    p.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for")
    p.add_argument("--max-upload-bytes", type=int, default=None,
                   help="largest image upload (default: download.max_bytes)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def serve_main(argv: list[str]) -> int:
    from artsim.command import run_command

    args = serve_parser().parse_args(argv)
    return run_command(lambda: _serve(args))


def _serve(args) -> int:
    import os

    import uvicorn

    from artsim.serve.app import create_app
    from artsim.serve.queries import Limits
    from artsim.serve.registry import IndexRegistry

    if not 0 < args.port < 65536:
        raise ArtsimError(f"--port: {args.port} is not a TCP port")
    if args.max_k < 1:
        raise ArtsimError("--max-k: must be at least 1")
    threads = args.threads or max(8, 4 * (os.cpu_count() or 1))
    if threads < 1:
        raise ArtsimError("--threads: must be at least 1")
    limits = Limits(max_k=args.max_k)
    if args.max_upload_bytes is not None:
        if args.max_upload_bytes < 1:
            raise ArtsimError("--max-upload-bytes: must be at least 1")
        limits.max_upload_bytes = args.max_upload_bytes
    logging.getLogger().setLevel(args.log_level.upper())
    registry = IndexRegistry(args.indexes, cache_dir=args.cache_dir, poll_seconds=args.poll_seconds,
                             retry_refused_seconds=args.retry_refused_seconds)
    app = create_app(registry, limits, threads=threads)
    names = ", ".join(f"{s['name']} ({s['vectors']} vectors, version {s['version']})" for s in registry.status())
    log.info("serving %s at http://%s:%d with %d threads (reload: %s)", names, args.host, args.port, threads,
             f"every {args.poll_seconds:g} s" if args.poll_seconds else "off")

    try:
        # httptools + uvloop (pinned): the pure-Python h11 parser and asyncio loop cost more per request than
        # the HTTP layer's budget (benchmarks/bench_serve.py)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                    timeout_graceful_shutdown=30, http="httptools", loop="uvloop")
    finally:
        registry.close()
    return 0
