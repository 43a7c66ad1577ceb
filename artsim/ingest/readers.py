"""Reading source files from any URI (local, file://, s3://): file listing, gzip, CSV, JSON, JSON lines, Parquet.

Everything streams where the format allows (CSV, JSON lines, Parquet), so a 300 MB MetObjects.csv is never held
in memory as text. Broken rows become :class:`BadRow` items instead of exceptions.
"""
from __future__ import annotations

import csv
import glob as globlib
import gzip
import io
import json
import posixpath
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from artsim.errors import ArtsimError
from artsim.ingest.common import BadRow
from artsim.storage import Storage, is_s3

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
DATA_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".gz")
MAX_CONSECUTIVE_CSV_ERRORS = 1000  # a file that is not CSV at all stops here instead of reporting every line


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
def open_binary(storage: Storage, uri: str):
    """A binary stream of the file's content; gzip is recognised by its magic bytes, whatever the name."""
    fs, path = storage.fs(uri)
    with fs.open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        if head == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped
        else:
            yield raw


def sniff_format(storage: Storage, uri: str) -> str:
    """``csv``, ``jsonl``, ``json`` or ``parquet`` from the name (minus .gz), else from the first bytes."""
    name = uri.lower().removesuffix(".gz")
    for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                     (".json", "json"), (".csv", "csv"), (".tsv", "csv")):
        if name.endswith(ext):
            return fmt
    with open_binary(storage, uri) as f:
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

    def __init__(self, storage: Storage, uri: str):
        self.storage, self.uri = storage, uri
        self.header: list[str] = []

    @contextmanager
    def open(self) -> Iterator[Iterator[tuple[str, Any]]]:
        with open_binary(self.storage, self.uri) as raw:
            stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
            delimiter = "\t" if self.uri.lower().removesuffix(".gz").endswith(".tsv") else ","
            reader = csv.reader(stream, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                header = []
            except csv.Error as exc:
                raise ArtsimError(f"{self.uri}: cannot read the CSV header: {exc}") from None
            self.header = [h.strip() for h in header]
            yield self._rows(reader)

    def _rows(self, reader) -> Iterator[tuple[str, Any]]:
        n = len(self.header)
        row_number = 0
        errors_in_a_row = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row_number += 1
                errors_in_a_row += 1
                yield f"row {row_number}", BadRow(f"row {row_number} (line {reader.line_num})", f"CSV error: {exc}")
                if errors_in_a_row >= MAX_CONSECUTIVE_CSV_ERRORS:
                    yield "end", BadRow(f"line {reader.line_num}", "too many consecutive CSV errors; rest of file skipped")
                    return
                continue
            errors_in_a_row = 0
            if not values or (len(values) == 1 and not values[0].strip()):
                continue  # blank line
            row_number += 1
            position = f"row {row_number}"
            if len(values) != n:
                yield position, BadRow(f"{position} (line {reader.line_num})",
                                       f"{len(values)} fields, the header has {n}")
                continue
            yield position, dict(zip(self.header, values))


# -- JSON -----------------------------------------------------------------------------------------------------------


def read_json_document(storage: Storage, uri: str) -> tuple[Any, list[BadRow]]:
    """A parsed JSON document, or for JSON lines the list of parsed lines plus a BadRow per broken line."""
    with open_binary(storage, uri) as f:
        data = f.read()
    try:
        textual = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArtsimError(f"{uri}: not UTF-8 text: {exc}") from None
    try:
        return json.loads(textual), []
    except (json.JSONDecodeError, RecursionError) as exc:
        lines = [ln for ln in textual.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            return _json_lines(textual.splitlines())
        raise ArtsimError(f"{uri}: not valid JSON (nor JSON lines): {exc}") from None


def _json_lines(lines) -> tuple[list, list[BadRow]]:
    items, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            bad.append(BadRow(f"line {number}", f"not valid JSON: {exc}"))
    return items, bad


def json_line_rows(storage: Storage, uri: str) -> Iterator[tuple[str, Any]]:
    """Streams a JSON-lines file (or a JSON array of objects) as (position, object | BadRow)."""
    if sniff_format(storage, uri) == "json":
        data, _ = read_json_document(storage, uri)
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            yield f"[{i}]", row if isinstance(row, dict) else BadRow(f"[{i}]", "not a JSON object")
        return
    with open_binary(storage, uri) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            position = f"line {number}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                yield position, BadRow(position, f"not valid JSON: {exc}")
                continue
            yield position, row if isinstance(row, dict) else BadRow(position, "not a JSON object")


# -- Parquet --------------------------------------------------------------------------------------------------------


def parquet_columns(storage: Storage, uri: str) -> list[str]:
    import pyarrow.parquet as pq

    with open_binary(storage, uri) as f:
        try:
            return list(pq.ParquetFile(f).schema_arrow.names)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-Parquet bytes
            raise ArtsimError(f"{uri}: not a readable Parquet file: {exc}") from None


def parquet_rows(storage: Storage, uri: str, columns: Optional[list[str]] = None,
                 batch_size: int = 10_000) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    with open_binary(storage, uri) as f:
        pf = pq.ParquetFile(f)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for item in batch.to_pylist():
                row += 1
                yield f"row {row}", item
