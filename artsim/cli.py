"""`artsim STAGE -c CONFIG [--set key.path=value ...]`, `artsim query ...`, `artsim serve ...` and
`artsim export ...` (docs/DESIGN.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from artsim.config import STAGES
from artsim.command import OneLineParser, error_line, run_command
from artsim.errors import ArtsimError


# `artsim --help`: every command, one line each.
COMMANDS = {
    "ingest": "read the configured sources into records/ (one row per work)",
    "download": "fetch every record's image politely into images/ (resumable; --retry-failed)",
    "embed": "embed every downloaded image with embed.model into embeddings/<model>/",
    "mine": "mine (anchor, positive, negative) triplets from shared metadata into triplets/",
    "train": "train a similarity model on the triplets with Ray Train into models/<train.name>/",
    "index": "build the sharded FAISS index of one embeddings set into index/<name>/",
    "links": "link every work to its nearest works in other collections into links/<name>/",
    "report": "write the curator report (HTML) into reports/",
    "pipeline": "run pipeline.stages in order, with one summary table at the end",
    "plan": "project wall time, node counts and cost of a run of N works on a cluster",
    "query": "nearest neighbours of a work, an image or (CLIP models) a text, from a built index",
    "serve": "serve an index over HTTP (search API, hot reload from S3)",
    "export": "write the ok images and their records as webdataset or img2dataset shards",
    "demo": "the embedded 80-work Met demo, end to end on a private Ray",
}

# Each stage's --help: the config sections it reads (besides run, storage) and what it writes under run.root.
STAGE_IO = {
    "ingest": ("sources", "records/ (Parquet, one row per work) and records/_report.json (counts per source)"),
    "download": ("download, ray", "images/ (Parquet shards: status, bytes, size per record), images/_report.json, "
                                  "images/_SUCCESS"),
    "embed": ("embed, ray", "embeddings/<model key>/ (vectors per ok image), _model.json, _report.json"),
    "mine": ("mine", "triplets/ (Parquet: anchor, positive, negative, strategy)"),
    "train": ("train, embed, ray", "models/<train.name>/ (checkpoints, export/) and, in head mode, "
                                   "embeddings/<model>-<train.name>/"),
    "index": ("index, ray", "index/<name>/ (manifest.json, shards/*.faiss, ids.parquet)"),
    "links": ("links, ray", "links/<index name>/ (Parquet: object_id, neighbor, score, collections)"),
    "report": ("report, index", "reports/report/index.html"),
    "pipeline": ("pipeline and every stage's own", "what each stage in pipeline.stages writes"),
}


def _stage_parser(prog: str) -> argparse.ArgumentParser:
    stage = prog.rsplit(" ", 1)[-1]
    reads, writes = STAGE_IO.get(stage, ("", ""))
    p = OneLineParser(
        prog=prog, description=COMMANDS.get(stage), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"reads config sections: run, storage, {reads}\n"
                f"writes under run.root: {writes}; also summaries/"
                f"{'<stage>' if stage == 'pipeline' else stage}.json and config.yaml (the effective config)"
                + ("\nray.address null joins RAY_ADDRESS or a running `ray start`, else starts a private Ray"
                   if "ray" in reads or stage == "pipeline" else "")))
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--retry-failed", action="store_true",
                   help="download: also refetch records whose committed status is retryable (http_error, "
                        "timeout); internal_error records are refetched by every run")
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
    return run_command(lambda: _run_stage(stage, args))


def _run_stage(stage: str, args) -> int:
    from artsim.config import load_config
    from artsim.pipeline import run_pipeline, run_stage
    from artsim.runtime import RunContext

    ctx = RunContext(load_config(args.config, args.overrides))
    ctx.check_run_root()
    if stage == "pipeline":
        run_pipeline(ctx, retry_failed=args.retry_failed)
    else:
        options = {"retry_failed": True} if (stage == "download" and args.retry_failed) else {}
        run_stage(ctx, stage, **options)
    return 0


def query_main(argv: list[str]) -> int:
    p = OneLineParser(prog="artsim query", description="Nearest neighbours from an artsim index.")
    p.add_argument("--index", required=True, help="URI of index/<name>/ (local, file:// or s3://)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", dest="object_id", help="object_id of an indexed work")
    what.add_argument("--image", help="image file; embedded with the model named in the manifest")
    what.add_argument("--text", help="a text, for an index built with a CLIP model (embed.model: open_clip:<arch>); "
                                     "embedded with that model's text tower")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="pre-filter on a facet column (repeatable; VALUE may be a|b for any of several)")
    p.add_argument("--farthest", action="store_true", help="least similar works instead of most similar")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    return run_command(lambda: _query(args))


def _query(args) -> int:
    from artsim.serving import ShardedIndex, parse_where

    if args.k < 1:
        raise ArtsimError("-k: must be at least 1")
    if args.image is not None:
        _check_image_path(args.image)
    if args.text is not None and not args.text.strip():
        raise ArtsimError("--text: must not be empty")
    where = parse_where(args.where)
    index = ShardedIndex.open(args.index, cache_dir=args.cache_dir)
    if args.object_id:
        search = index.farthest_ids if args.farthest else index.search_ids
        hits = search([args.object_id], args.k, where=where)[0]
    elif args.text is not None:
        hits = index.search_text(args.text, args.k, where=where, farthest=args.farthest)[0]
    else:
        vectors = index.embed_images([args.image])
        search = index.farthest if args.farthest else index.search
        hits = search(vectors, args.k, where=where)[0]
    if args.json:
        from artsim.console import json_line

        for hit in hits:
            print(json_line(hit))
    else:
        from artsim.console import table

        cols = ["rank", "score", "object_id"] + [c for c in ("title", "creator", "collection", "culture")
                                                  if hits and c in hits[0]]
        table(cols, [[f"{h[c]:.4f}" if c == "score" else h.get(c) for c in cols] for h in hits])
    return 0


def _check_image_path(path: str) -> None:
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ArtsimError(f"--image: {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ArtsimError(f"--image: {path} is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise ArtsimError(f"--image: {path} is not a regular file")


USAGE = f"usage: artsim {{{','.join(COMMANDS)}}} ..."
assert set(STAGES) <= set(COMMANDS)


def help_text() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [USAGE, "", "artsim: museum collections -> images -> embeddings -> similarity indexes, on Ray.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, line in COMMANDS.items()]
    lines += ["", "`artsim COMMAND --help` says what a command reads and writes. Stages take -c CONFIG and "
              "--set key.path=value; the config reference is in README.md."]
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    p = OneLineParser(
        prog="artsim plan", description=COMMANDS["plan"], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="reads config sections: run (earlier runs' summaries/), pipeline, sources, download, embed, mine, "
               "train\nwrites nothing; prints a table and the assumptions it made")
    p.add_argument("works", type=int, metavar="N", help="number of works (records) to plan for")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--cluster", default=None,
                   help="Ray cluster-launcher YAML with the node types (default: cluster.yaml if it exists, "
                        "else this machine)")
    p.add_argument("--runs", action="append", default=[], metavar="RUN_ROOT",
                   help="more run directories whose summaries/ hold measured rates (run.root is always read)")
    p.add_argument("--price", action="append", default=[], metavar="INSTANCE=USD_PER_HOUR")
    p.add_argument("--ok-fraction", type=float, default=None, help="share of downloads that end ok")
    p.add_argument("--hosts", type=int, default=None, help="distinct image hosts (politeness caps apply per host)")
    args = p.parse_args(argv)
    return run_command(lambda: _plan(args))


def _plan(args) -> int:
    from artsim.plan import run_plan

    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "plan":
        return plan_main(rest)
    if command in STAGES or command == "pipeline":
        return stage_main(command, rest)
    if command == "query":
        return query_main(rest)
    if command == "serve":
        from artsim.serve.cli import serve_main

        return serve_main(rest)
    if command == "export":
        from artsim.export import export_main

        return export_main(rest)
    if command == "demo":
        from artsim.demo import demo_main

        return run_command(lambda: demo_main(rest))
    print(error_line(f"unknown command {command!r}; {USAGE}"), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
