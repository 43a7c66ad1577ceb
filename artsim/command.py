"""Running a command: one-line usage errors (``OneLineParser``) and ``run_command``, which turns bad input into one
line and exit 2, a bug into one line, exit 1 and a traceback file, and keeps data out of the terminal unescaped.
Used by every entry point (``artsim`` and its subcommands, ``jobs/*.py``)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from artsim.errors import ArtsimError

MAX_MESSAGE_CHARS = 2000  # an error line quoting hostile data stays readable


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``artsim query: error: ...``) and exit status 2."""

    def error(self, message: str):
        from artsim.console import printable

        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


# OS errors that mean "the path the user gave (or its disk) is wrong", not "artsim has a bug".
USER_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
               errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY, errno.EXDEV}


def error_line(message: str) -> str:
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


def run_command(fn) -> int:
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
        print(error_line(str(_user_error(exc))), file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # StageFailed (records committed, a bug met): 1
    except OSError as exc:
        if exc.errno in USER_ERRNOS and exc.filename is not None:
            target = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
            print(error_line(f"{target}: {exc.strerror}"), file=sys.stderr)
            return 2
        return _unexpected(exc)
    except UnicodeError as exc:
        print(error_line(f"text that is not valid UTF-8: {exc}"), file=sys.stderr)
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
    print(error_line(f"internal error (a bug in artsim, please report it): {summary}; {where}"), file=sys.stderr)
    return 1
