"""`artsim STAGE -c CONFIG [--set key.path=value ...]`, `artsim query ...` and `artsim serve ...` (docs/DESIGN.md)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from artsim.config import STAGES
from artsim.errors import ArtsimError

MAX_MESSAGE_CHARS = 2000  # an error line quoting hostile data stays readable


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``artsim query: error: ...``) and exit status 2."""

    def error(self, message: str):
        from artsim.console import printable

        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def _stage_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog)
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--retry-failed", action="store_true",
                   help="download: refetch only records whose status is retryable")
    return p


def stage_main(stage: str, argv: list[str]) -> int:
    """Entry point shared by `artsim STAGE` and `python jobs/STAGE.py`."""
    args = _stage_parser(f"artsim {stage}").parse_args(argv)
    return _guard(lambda: _run_stage(stage, args))


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
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="pre-filter on a facet column (repeatable; VALUE may be a|b for any of several)")
    p.add_argument("--farthest", action="store_true", help="least similar works instead of most similar")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    return _guard(lambda: _query(args))


def _query(args) -> int:
    from artsim.serving import ShardedIndex, parse_where

    if args.k < 1:
        raise ArtsimError("-k: must be at least 1")
    if args.image is not None:
        _check_image_path(args.image)
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


# OS errors that mean "the path the user gave (or its disk) is wrong", not "artsim has a bug".
USER_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
               errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY, errno.EXDEV}


def _error_line(message: str) -> str:
    from artsim.console import printable

    line = printable(message)
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[:MAX_MESSAGE_CHARS] + f"... ({len(line) - MAX_MESSAGE_CHARS} more characters)"
    return f"artsim: error: {line}"


def _user_error(exc: BaseException) -> BaseException:
    """The ArtsimError behind ``exc`` where Ray wrapped one raised in a worker (its text holds a remote traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ArtsimError) else exc


def _write_traceback(exc: BaseException) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="artsim-traceback-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(f"artsim {' '.join(sys.argv[1:2])}: unexpected {type(exc).__name__}\n\n")
        traceback.print_exception(exc, file=f)
    return path


def _guard(fn) -> int:
    """Run a command: bad input exits 2 with one line naming the key or file; a bug exits 1 with one line and the
    path of a file that holds the full traceback. Nothing from the data reaches the terminal unescaped."""
    from artsim.console import PrintableFormatter

    logging.basicConfig(level=logging.INFO)
    for noisy in ("botocore", "aiobotocore", "s3fs"):  # "Found credentials in environment variables" on every run
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        return fn()
    except KeyboardInterrupt:
        print("artsim: interrupted", file=sys.stderr)
        return 130
    except ArtsimError as exc:
        print(_error_line(str(_user_error(exc))), file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in USER_ERRNOS and exc.filename is not None:
            target = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
            print(_error_line(f"{target}: {exc.strerror}"), file=sys.stderr)
            return 2
        return _unexpected(exc)
    except UnicodeError as exc:
        print(_error_line(f"text that is not valid UTF-8: {exc}"), file=sys.stderr)
        return 2
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: BaseException) -> int:
    try:
        where = f"full traceback in {_write_traceback(exc)}"
    except OSError as write_error:
        where = f"the traceback could not be written ({write_error.strerror})"
    summary = f"{type(exc).__name__}: {exc}"
    if len(summary) > 300:
        summary = summary[:300] + "..."
    print(_error_line(f"internal error (a bug in artsim, please report it): {summary}; {where}"), file=sys.stderr)
    return 1


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
    print(_error_line(f"unknown command {command!r}; {USAGE}"), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
