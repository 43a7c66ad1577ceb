"""`artsim STAGE -c CONFIG [--set key.path=value ...]`, `artsim query ...` and `artsim serve ...` (docs/DESIGN.md)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from artsim.config import STAGES
from artsim.errors import ArtsimError


def _stage_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--retry-failed", action="store_true",
                   help="download: refetch only records whose status is retryable")
    p.add_argument("--walk", nargs=2, metavar=("START_ID", "END_ID"),
                   help="report: a latent walk between these two works (same as report.walk)")
    p.add_argument("--sheet", dest="sheets", action="append", default=[], metavar="ID|cluster:N",
                   help="report: a printable neighbour sheet for this work or cluster (repeatable; report.sheets)")
    return p


def stage_main(stage: str, argv: list[str]) -> int:
    """Entry point shared by `artsim STAGE` and `python jobs/STAGE.py`."""
    parser = _stage_parser(f"artsim {stage}")
    args = parser.parse_args(argv)
    if (args.walk or args.sheets) and stage not in ("report", "pipeline"):
        parser.error("--walk and --sheet are options of the report stage")
    # as config overrides (JSON is YAML), so they are validated like report.walk / report.sheets in a file
    if args.walk:
        args.overrides.append(f"report.walk={json.dumps(args.walk)}")
    if args.sheets:
        args.overrides.append(f"report.sheets={json.dumps(args.sheets)}")
    return _guard(lambda: _run_stage(stage, args))


def _run_stage(stage: str, args) -> int:
    from artsim.config import load_config
    from artsim.pipeline import run_pipeline, run_stage
    from artsim.runtime import RunContext

    ctx = RunContext(load_config(args.config, args.overrides))
    if stage == "pipeline":
        run_pipeline(ctx, retry_failed=args.retry_failed)
    else:
        options = {"retry_failed": True} if (stage == "download" and args.retry_failed) else {}
        run_stage(ctx, stage, **options)
    return 0


def query_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="artsim query", description="Nearest neighbours from an artsim index.")
    p.add_argument("--index", required=True, help="URI of index/<name>/ (local, file:// or s3://)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", dest="object_id", help="object_id of an indexed work")
    what.add_argument("--image", help="image file; embedded with the model named in the manifest")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="pre-filter on a facet column (repeatable; VALUE may be a|b for any of several)")
    p.add_argument("--farthest", action="store_true", help="least similar works instead of most similar")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    return _guard(lambda: _query(args))


def _query(args) -> int:
    import json

    from artsim.serving import ShardedIndex, parse_where

    if args.k < 1:
        raise ArtsimError("-k: must be at least 1")
    where = parse_where(args.where)
    index = ShardedIndex.open(args.index, cache_dir=args.cache_dir)
    if args.object_id:
        search = index.farthest_ids if args.farthest else index.search_ids
        hits = search([args.object_id], args.k, where=where)[0]
    else:
        vectors = index.embed_images([args.image])
        search = index.farthest if args.farthest else index.search
        hits = search(vectors, args.k, where=where)[0]
    if args.json:
        for hit in hits:
            print(json.dumps(hit, default=str, ensure_ascii=False))
    else:
        from artsim.console import table

        cols = ["rank", "score", "object_id"] + [c for c in ("title", "creator", "collection", "culture")
                                                  if hits and c in hits[0]]
        table(cols, [[f"{h[c]:.4f}" if c == "score" else h.get(c) for c in cols] for h in hits])
    return 0


def _guard(fn) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except ArtsimError as exc:
        print(f"artsim: error: {exc}", file=sys.stderr)
        return 2


USAGE = f"usage: artsim {{{','.join(STAGES + ('pipeline', 'query', 'serve', 'demo'))}}} ..."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in STAGES or command == "pipeline":
        return stage_main(command, rest)
    if command == "query":
        return query_main(rest)
    if command == "serve":
        from artsim.serve.cli import serve_main

        return serve_main(rest)
    if command == "demo":
        from artsim.demo import demo_main

        return _guard(lambda: demo_main(rest))
    print(f"artsim: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
