"""Reading source files from any URI (local, file://, s3://): file listing, gzip, CSV, JSON, JSON lines, Parquet.

Everything streams where the format allows (CSV, JSON lines, Parquet), so a 300 MB MetObjects.csv is never held
in memory as text. Broken rows become :class:`BadRow` items instead of exceptions.

Sources are written by outsiders, so every read is bounded (:class:`ReadLimits`, from the ``ingest`` config section):
only regular files and S3 objects are opened (a FIFO, a device or a symlink to one is refused before it is opened);
one source reads at most ``max_source_bytes`` (after gunzip) and a JSON document at most ``max_document_bytes``
(each a one-line error naming the key); a CSV row or JSON line over ``max_row_chars`` and a field over
``max_field_chars`` become unparsable rows; a read that returns nothing for ``read_timeout_s`` ends the source.
"""
from __future__ import annotations

import csv
import glob as globlib
import gzip
import io
import json
import os
import posixpath
import queue
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from artsim.errors import ArtsimError
from artsim.ingest.common import BadRow
from artsim.storage import Storage, is_s3, strip_scheme

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
DATA_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".gz")
MAX_CONSECUTIVE_CSV_ERRORS = 1000  # a file that is not CSV at all stops here instead of reporting every line
READ_CHUNK = 1 << 20  # bytes per read of the underlying file (each read is one deadline-guarded call)


# -- limits ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadLimits:
    """Caps on reading one source; the defaults are those of ``artsim.config.IngestConfig``."""

    max_source_bytes: int = 4_000_000_000
    max_document_bytes: int = 1_000_000_000
    max_row_chars: int = 10_000_000
    max_field_chars: int = 131_072
    read_timeout_s: float = 120.0

    @classmethod
    def from_config(cls, ingest) -> "ReadLimits":
        return cls(ingest.max_source_bytes, ingest.max_document_bytes, ingest.max_row_chars, ingest.max_field_chars,
                   ingest.read_timeout_s)


class SourceBudget:
    """What one source has read so far, shared by all its files; ``key`` (``sources.N.path``) names it in errors."""

    def __init__(self, limits: Optional[ReadLimits] = None, key: str = "source"):
        self.limits = limits or ReadLimits()
        self.key = key
        self.bytes_read = 0

    def charge(self, n: int, uri: str) -> None:
        self.bytes_read += n
        if self.bytes_read > self.limits.max_source_bytes:
            raise ArtsimError(f"{self.key}: {uri}: the source is larger than ingest.max_source_bytes "
                              f"({self.limits.max_source_bytes} bytes, after gunzip); split it or raise the cap")


def _budget(budget: Optional[SourceBudget]) -> SourceBudget:
    return budget if budget is not None else SourceBudget()


class _Deadline:
    """Runs blocking reads on a helper thread and gives up on one that takes longer than ``seconds``.

    A read stuck in the kernel (a hung network mount, an S3 connection that stopped sending) cannot be interrupted
    from Python; the helper thread is a daemon, so the process can still report the stall and exit.
    """

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            fn, reply = request
            try:
                reply.put((True, fn()))
            except BaseException as exc:  # handed to the caller's thread, which raises it
                reply.put((False, exc))

    def call(self, fn):
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="artsim-source-read", daemon=True)
            self._thread.start()
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((fn, reply))
        try:
            ok, value = reply.get(timeout=self.seconds)
        except queue.Empty:
            self._thread = None  # abandoned with its stuck read; a later call (there should be none) gets a new one
            raise ArtsimError(f"{self.what}: a read stalled for more than {self.seconds:g} s "
                              f"(ingest.read_timeout_s)") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread is not None:
            self._requests.put(None)
            self._thread = None


class _Seekable(io.RawIOBase):
    """A raw stream over ``self._raw`` that passes seeking through."""

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


class _GuardedRaw(_Seekable):
    """The raw file, every read cut by a deadline (reads go to a private buffer: a stuck read never writes into a
    buffer that its caller has moved on from)."""

    def __init__(self, raw, deadline: _Deadline):
        self._raw, self._deadline = raw, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._deadline.call(lambda: self._raw.read(len(b)))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            self._deadline.close()
            super().close()


class _Counted(_Seekable):
    """The content stream (after gunzip), every byte charged to the source's budget."""

    def __init__(self, inner, budget: SourceBudget, uri: str):
        self._raw, self._budget, self._uri = inner, budget, uri

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        self._budget.charge(n or 0, self._uri)
        return n


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _not_regular(mode: int) -> Optional[str]:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def check_regular_file(storage: Storage, uri: str, what: str) -> None:
    """Refuse a local source path that is not a regular file (FIFO, device, socket, directory), before anything is
    opened or any worker starts; S3 objects are always plain objects."""
    if is_s3(uri):
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        kind = _not_regular(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ArtsimError(f"{what}: source file not found") from None
    except OSError as exc:
        raise ArtsimError(f"{what}: cannot read: {exc.strerror or exc}") from None
    if kind is not None:
        raise ArtsimError(f"{what}: {uri} is {kind}, not a regular file (only regular files and S3 objects are "
                          "read)")


def open_regular_file(path: str, what: str):
    """An unbuffered binary file object for ``path``, which must be a regular file (symlinks are followed).

    Checked before opening (opening a device can have effects of its own) and again on the open descriptor (the
    path may have been swapped in between); opened non-blocking so that a FIFO swapped in cannot hang the open.
    """
    try:
        kind = _not_regular(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ArtsimError(f"{what}: source file not found") from None
    except OSError as exc:
        raise ArtsimError(f"{what}: cannot read: {exc.strerror or exc}") from None
    if kind is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ArtsimError(f"{what}: cannot open: {exc.strerror or exc}") from None
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind is None:
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb", buffering=0)
        os.close(fd)
    raise ArtsimError(f"{what} is {kind}, not a regular file (only regular files and S3 objects are read)")


def source_files(storage: Storage, uri: str, key: str) -> list[str]:
    """URIs of the files a source path names: a file, a directory (its data files), or a glob pattern.

    ``key`` (``sources.N.path``) names the config entry in errors.
    """
    fs, path = storage.fs(uri)
    prefix = "s3://" if is_s3(uri) else ""
    if globlib.has_magic(path):
        matches = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        if not matches:
            raise ArtsimError(f"{key}: no files match {uri}")
        return [prefix + m for m in matches]
    try:
        exists = fs.exists(path)
    except Exception as exc:  # endpoint down, bad credentials, malformed bucket name
        raise ArtsimError(f"{key}: cannot read {uri}: {exc}") from None
    if not exists:
        raise ArtsimError(f"{key}: source file not found: {uri}")
    if fs.isdir(path):
        names = sorted(p for p in fs.ls(path, detail=False)
                       if not posixpath.basename(p.rstrip("/")).startswith((".", "_"))
                       and p.lower().endswith(DATA_EXTENSIONS) and not fs.isdir(p))
        if not names:
            raise ArtsimError(f"{key}: directory {uri} holds no data files ({', '.join(DATA_EXTENSIONS)})")
        return [prefix + n if not n.startswith(prefix) else n for n in names]
    return [uri]


@contextmanager
def open_binary(storage: Storage, uri: str, budget: Optional[SourceBudget] = None):
    """A binary stream of the file's content; gzip is recognised by its magic bytes, whatever the name.

    Every read is charged to ``budget`` (after gunzip) and cut by its deadline.
    """
    budget = _budget(budget)
    what = f"{budget.key}: {uri}"
    if is_s3(uri):
        fs, path = storage.fs(uri)
        deadline = _Deadline(budget.limits.read_timeout_s, what)
        raw = deadline.call(lambda: fs.open(path, "rb"))
    else:
        deadline = _Deadline(budget.limits.read_timeout_s, what)
        raw = open_regular_file(os.path.abspath(strip_scheme(uri)), what)
    with io.BufferedReader(_GuardedRaw(raw, deadline), buffer_size=READ_CHUNK) as guarded:
        if guarded.peek(2)[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=guarded) as unzipped:
                with io.BufferedReader(_Counted(unzipped, budget, uri), buffer_size=64 * 1024) as counted:
                    yield counted
        else:
            with io.BufferedReader(_Counted(guarded, budget, uri), buffer_size=64 * 1024) as counted:
                yield counted


def sniff_format(storage: Storage, uri: str, budget: Optional[SourceBudget] = None) -> str:
    """``csv``, ``jsonl``, ``json`` or ``parquet`` from the name (minus .gz), else from the first bytes."""
    name = uri.lower().removesuffix(".gz")
    for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                     (".json", "json"), (".csv", "csv"), (".tsv", "csv")):
        if name.endswith(ext):
            return fmt
    with open_binary(storage, uri, budget) as f:
        head = f.read(4096)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    return "csv"


# -- CSV ------------------------------------------------------------------------------------------------------------


class CsvSource:
    """Streams a CSV file as (position, row dict) pairs; ``header`` is known after :meth:`open`.

    Rows whose field count differs from the header's, and lines the csv module cannot parse, come out as
    :class:`BadRow` items. A UTF-8 BOM is dropped; undecodable bytes become U+FFFD rather than stopping the job.
    """

    def __init__(self, storage: Storage, uri: str, budget: Optional[SourceBudget] = None):
        self.storage, self.uri = storage, uri
        self.budget = _budget(budget)
        self.header: list[str] = []

    @contextmanager
    def open(self) -> Iterator[Iterator[tuple[str, Any]]]:
        limits = self.budget.limits
        # The csv module's field cap is process-wide; ingest sets it to its own cap (the module default is 131072).
        csv.field_size_limit(limits.max_field_chars)
        with open_binary(self.storage, self.uri, self.budget) as raw:
            stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
            lines = _BoundedLines(stream, limits.max_row_chars)
            delimiter = "\t" if self.uri.lower().removesuffix(".gz").endswith(".tsv") else ","
            reader = csv.reader(lines, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                header = []
            except csv.Error as exc:
                raise ArtsimError(f"{self.uri}: cannot read the CSV header: {exc}") from None
            self.header = [h.strip() for h in header]
            yield self._rows(reader, lines)

    def _rows(self, reader, lines: "_BoundedLines") -> Iterator[tuple[str, Any]]:
        return csv_rows(reader, self.header, lines)


def csv_rows(reader, header: list[str], lines: Optional["_BoundedLines"] = None, where: str = ""
             ) -> Iterator[tuple[str, Any]]:
    """(position, row dict | BadRow) for every row of a csv.reader positioned after the header: rows with the wrong
    number of fields, over-long rows (``lines``: the row-length cap, reset at each row) and CSV errors become
    BadRows; blank lines are skipped; after MAX_CONSECUTIVE_CSV_ERRORS errors in a row the rest is skipped.
    ``where`` is added to every line label (a byte range of a file: " after byte N")."""
    n = len(header)
    row_number = 0
    errors_in_a_row = 0
    while True:
        if lines is not None:
            lines.start_row()
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            row_number += 1
            errors_in_a_row += 1
            yield f"row {row_number}{where}", BadRow(f"row {row_number} (line {reader.line_num}{where})", f"CSV error: {exc}")
            if errors_in_a_row >= MAX_CONSECUTIVE_CSV_ERRORS:
                rest = "rest of this range skipped" if where else "rest of file skipped"
                yield "end", BadRow(f"line {reader.line_num}{where}", f"too many consecutive CSV errors; {rest}")
                return
            continue
        errors_in_a_row = 0
        if not values or (len(values) == 1 and not values[0].strip()):
            continue  # blank line
        row_number += 1
        position = f"row {row_number}{where}"
        if len(values) != n:
            yield position, BadRow(f"row {row_number} (line {reader.line_num}{where})",
                                   f"{len(values)} fields, the header has {n}")
            continue
        yield position, dict(zip(header, values))


class RowTooLong(csv.Error):
    """A CSV row or JSON line longer than ``ingest.max_row_chars`` (a csv.Error, so the CSV loop counts it)."""


class _BoundedLines:
    """Lines of a text stream, none read into memory beyond ``max_chars``: an over-long line is skipped to its end
    (in bounded pieces) and raised as :class:`RowTooLong`. For CSV, the characters of all lines of one row (quoted
    fields span lines) count together from :meth:`start_row`."""

    def __init__(self, stream, max_chars: int):
        self.stream, self.max_chars = stream, max_chars
        self.row_chars = 0

    def start_row(self) -> None:
        self.row_chars = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.stream.readline(self.max_chars + 1)
        if not line:
            raise StopIteration
        self.row_chars += len(line)
        if self.row_chars > self.max_chars:
            length = self.row_chars
            while line and not line.endswith(("\n", "\r")):  # skip the rest of the line, a piece at a time
                line = self.stream.readline(READ_CHUNK)
                length += len(line)
            self.row_chars = 0
            raise RowTooLong(f"row of {length}{'+' if not line else ''} characters is longer than "
                             f"ingest.max_row_chars ({self.max_chars})")
        return line


# -- JSON -----------------------------------------------------------------------------------------------------------


def _read_document(storage: Storage, uri: str, budget: SourceBudget) -> bytes:
    cap = budget.limits.max_document_bytes
    parts, size = [], 0
    with open_binary(storage, uri, budget) as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise ArtsimError(f"{budget.key}: {uri}: a JSON document larger than ingest.max_document_bytes "
                                  f"({cap} bytes) is not parsed whole; write it as JSON lines or raise the cap")
            parts.append(chunk)
    return b"".join(parts)


def read_json_document(storage: Storage, uri: str, budget: Optional[SourceBudget] = None
                       ) -> tuple[Any, list[BadRow]]:
    """A parsed JSON document, or for JSON lines the list of parsed lines plus a BadRow per broken line."""
    budget = _budget(budget)
    data = _read_document(storage, uri, budget)
    try:
        textual = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArtsimError(f"{uri}: not UTF-8 text: {exc}") from None
    try:
        return json.loads(textual), []
    except (json.JSONDecodeError, RecursionError) as exc:
        lines = [ln for ln in textual.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            return _json_lines(textual.splitlines(), budget.limits.max_row_chars)
        raise ArtsimError(f"{uri}: not valid JSON (nor JSON lines): {exc}") from None


def _json_lines(lines, max_chars: int) -> tuple[list, list[BadRow]]:
    items, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > max_chars:
            bad.append(BadRow(f"line {number}", f"{len(line)} characters, longer than ingest.max_row_chars "
                                                f"({max_chars})"))
            continue
        try:
            items.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            bad.append(BadRow(f"line {number}", f"not valid JSON: {exc}"))
    return items, bad


def json_line_rows(storage: Storage, uri: str, budget: Optional[SourceBudget] = None) -> Iterator[tuple[str, Any]]:
    """Streams a JSON-lines file (or a JSON array of objects) as (position, object | BadRow)."""
    budget = _budget(budget)
    max_field = budget.limits.max_field_chars
    if sniff_format(storage, uri, budget) == "json":
        data, _ = read_json_document(storage, uri, budget)
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            yield f"[{i}]", _checked_row(f"[{i}]", row, max_field)
        return
    with open_binary(storage, uri, budget) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")
        lines = _BoundedLines(stream, budget.limits.max_row_chars)
        number = 0
        while True:
            number += 1
            position = f"line {number}"
            lines.start_row()
            try:
                line = next(lines)
            except StopIteration:
                return
            except RowTooLong as exc:
                yield position, BadRow(position, str(exc))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                yield position, BadRow(position, f"not valid JSON: {exc}")
                continue
            yield position, _checked_row(position, row, max_field)


def _checked_row(position: str, row: Any, max_field: int) -> Any:
    """A table row (dict), or a BadRow if it is not an object or one of its text values is over the field cap."""
    if not isinstance(row, dict):
        return BadRow(position, "not a JSON object")
    for column, value in row.items():
        if isinstance(value, str) and len(value) > max_field:
            return BadRow(position, f"column {str(column)[:80]!r}: {len(value)} characters, longer than "
                                    f"ingest.max_field_chars ({max_field})")
    return row


# -- Parquet --------------------------------------------------------------------------------------------------------


def parquet_columns(storage: Storage, uri: str, budget: Optional[SourceBudget] = None) -> list[str]:
    import pyarrow.parquet as pq

    with open_binary(storage, uri, budget) as f:
        try:
            return list(pq.ParquetFile(f).schema_arrow.names)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-Parquet bytes
            raise ArtsimError(f"{uri}: not a readable Parquet file: {exc}") from None


def parquet_rows(storage: Storage, uri: str, columns: Optional[list[str]] = None,
                 batch_size: int = 10_000, budget: Optional[SourceBudget] = None) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    budget = _budget(budget)
    with open_binary(storage, uri, budget) as f:
        pf = pq.ParquetFile(f)
        # Compressed pages can expand enormously (a Parquet "bomb"): the uncompressed size the footer declares must
        # fit the source's byte cap before any page is decompressed. (A footer that lies is caught by pyarrow.)
        meta = pf.metadata
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if budget.bytes_read + declared > budget.limits.max_source_bytes:
            raise ArtsimError(f"{budget.key}: {uri}: {declared} bytes uncompressed is more than "
                              f"ingest.max_source_bytes ({budget.limits.max_source_bytes}) allows")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for item in batch.to_pylist():
                row += 1
                yield f"row {row}", _checked_row(f"row {row}", item, budget.limits.max_field_chars)
