"""`make demo` / `artsim demo`: the whole pipeline on the embedded Met sample, on a local Ray.

The images are served from a loopback HTTP server so that the real download path (safety checks, politeness,
resize, shards) runs; the config's image_url_template points the records at it.
"""
from __future__ import annotations

import functools
import http.server
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from artsim.console import say, table

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_IMAGES = REPO / "data" / "met_sample" / "images"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the download report counts requests; no per-request log lines
        pass


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (ephemeral port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="demo-image-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def demo_main(argv: list[str]) -> int:
    from artsim.command import OneLineParser

    p = OneLineParser(prog="artsim demo", description=__doc__)
    p.add_argument("-c", "--config", default=str(DEMO_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = p.parse_args(argv)

    from artsim.config import load_config
    from artsim.pipeline import run_pipeline
    from artsim.runtime import RunContext

    start = time.perf_counter()
    with serve_directory(DEMO_IMAGES) as base_url:
        say(f"serving the demo images from {base_url}")
        base = load_config(args.config, args.overrides)
        served = [f"sources.{i}.image_url_template={base_url}/met_{{local_id}}.jpg" for i in range(len(base.sources))]
        ctx = RunContext(load_config(args.config, served + args.overrides))
        ctx.check_run_root()
        result = run_pipeline(ctx)
    print_demo_summary(ctx, result, time.perf_counter() - start)
    return 0


def print_demo_summary(ctx, result: dict, seconds: float) -> None:
    from artsim.serving import ShardedIndex

    stages = result["stages"]
    say("=" * 100)
    say(f"demo finished in {seconds:.0f} s")
    ingest = stages.get("ingest", {})
    download = stages.get("download", {})
    say(f"records: {ingest.get('records', '?')}; images by status: {download.get('by_status', '?')}")
    table(["stage", "seconds"], [(n, f"{s:.1f}") for n, s in result["seconds"].items()])

    index_summary = stages.get("index", {})
    index_uri = index_summary.get("index_uri")
    if index_uri:
        index = ShardedIndex.open(index_uri)
        examples = _example_ids(index, ctx.config.report.example_queries)
        for object_id in examples:
            query = index.metadata(object_id)
            say(f"query {object_id}: {query.get('title')!r} by {query.get('creator') or 'unknown'}")
            hits = index.search_ids([object_id], 5)[0]
            table(["rank", "score", "object_id", "title", "creator"],
                  [(h["rank"], f"{h['score']:.3f}", h["object_id"], _cut(h.get("title")), _cut(h.get("creator")))
                   for h in hits])
        say(f"try: .venv/bin/artsim query --index {index_uri} --id {examples[0]} -k 10")
    say(f"outputs: {ctx.paths.root}/ (records/, images/, embeddings/, index/, links/, reports/)")
    report = stages.get("report", {}).get("report_uri")
    if report:
        say(f"report: {report}")


def _example_ids(index, n: int) -> list[str]:
    """Deterministic, spread-out examples: every (N/n)-th indexed object."""
    ids = index.object_ids()
    step = max(1, len(ids) // max(n, 1))
    return [ids[i] for i in range(0, len(ids), step)][:n]


def _cut(text, width: int = 40) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"
