"""Reading one ingest piece (see artsim/ingest/plan.py): whole files, byte ranges of a CSV or JSON-lines file, a
JSON document streamed item by item, or an API harvest. Plain functions, no Ray; each yields ``(uri, record |
BadRow)`` in source order with the source's options applied, using the same per-format parsers as a whole file.

Whole files go through ``artsim.ingest.stage.read_file`` (and so through artsim.ingest.readers and its limits);
ranges and streams open the file themselves and read at most their range (plus the rest of one line).
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
from typing import Any, Iterator, Optional

from artsim.errors import ArtsimError
from artsim.ingest.common import BadRow
from artsim.ingest.plan import JSON_KINDS, Segment
from artsim.storage import Storage

CSV_SCAN_BLOCK = 8 * 2**20
ITEMS_PER_PARSE = 1000  # streamed JSON items handed to a parser at a time


def read_segment(storage: Storage, source, key: str, segment: Segment, csv_bounds: tuple[int, int] | None = None,
                 api_context: Any = None, budget: Any = None) -> Iterator[dict | BadRow]:
    """Items of one segment of a piece. ``csv_bounds``: the exact [start, end) of a ``csv_range`` (a record start
    each, from :func:`csv_record_starts`); ``api_context``: what an ``api`` segment needs (see europeana_api)."""
    from artsim.ingest.stage import _apply_options, _local_path, check_template, read_file

    check_template(source, key)
    uri = segment.uri
    if segment.mode == "whole":
        yield from read_file(storage, source, key, uri, budget)
        return
    if segment.mode == "api":
        from artsim.ingest.europeana_api import harvest_items

        yield from harvest_items(storage, source, key, segment.start, api_context)
        return
    source_dir = posixpath.dirname(uri) if uri.startswith("s3://") else posixpath.dirname(_local_path(uri))
    if segment.mode == "csv_range":
        if csv_bounds is None:
            raise ValueError("csv_range needs its resolved bounds")
        items = _csv_range(storage, source, key, uri, *csv_bounds, budget=budget)
    elif segment.mode == "jsonl_range":
        items = _jsonl_range(storage, source, key, uri, segment.start, segment.end, budget=budget)
    elif segment.mode == "json_stream":
        items = _json_stream(storage, source, key, uri)
    else:
        raise ValueError(f"unknown segment mode {segment.mode!r}")
    for item in items:
        if isinstance(item, dict):
            _apply_options(item, source, source_dir)
        yield item


# -- byte ranges ----------------------------------------------------------------------------------------------------


class _Range(io.RawIOBase):
    """At most ``length`` bytes of a seekable binary file, from where it stands."""

    def __init__(self, raw, length: int):
        self._raw, self._left = raw, length

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._left <= 0:
            return 0
        data = self._raw.read(min(len(b), self._left))
        n = len(data)
        b[:n] = data
        self._left -= n
        return n


def _open_range(storage: Storage, uri: str, start: int, end: int):
    fs, path = storage.fs(uri)
    raw = fs.open(path, "rb")
    raw.seek(start)
    return raw, io.BufferedReader(_Range(raw, end - start), buffer_size=1 << 20)


def csv_record_starts(storage: Storage, uri: str, cuts: list[int]) -> list[int]:
    """Move each nominal cut (byte offsets, first 0, last the file size) forward to the start of a CSV record: the
    byte after a newline outside quotes (RFC 4180: a newline is a record end iff an even number of quote characters
    precede it; an escaped quote ``""`` keeps the parity). One sequential read of the file, counting quotes in C.
    Two cuts that land in one long record give an empty range."""
    size = cuts[-1]
    targets = sorted(set(c for c in cuts[1:-1] if 0 < c < size))
    found: dict[int, int] = {}
    fs, path = storage.fs(uri)
    quotes = 0  # quote characters before the current block
    offset = 0
    pending = list(targets)
    carry_from = None  # a target whose record start lies beyond the block it fell in
    with fs.open(path, "rb") as f:
        while pending and offset < size:
            block = f.read(CSV_SCAN_BLOCK)
            if not block:
                break
            end = offset + len(block)
            while pending and (carry_from is not None or pending[0] < end):
                target = pending[0]
                pos = max(target - 1, offset) - offset  # a record starting exactly at target: byte target-1 is \n
                parity = (quotes + block.count(b'"', 0, pos)) & 1
                while True:
                    nl = block.find(b"\n", pos)
                    if nl < 0:
                        break
                    parity ^= block.count(b'"', pos, nl) & 1
                    if parity == 0:
                        break
                    pos = nl + 1
                if nl < 0:
                    carry_from = target  # continue in the next block
                    break
                found[target] = offset + nl + 1
                pending.pop(0)
                carry_from = None
            quotes += block.count(b'"')
            offset = end
    out = [0]
    for c in cuts[1:-1]:
        out.append(min(max(found.get(c, size), out[-1]), size))
    out.append(size)
    return out


def _csv_header(storage: Storage, source, key: str, uri: str) -> list[str]:
    from artsim.ingest.met_csv import REQUIRED_COLUMNS
    from artsim.ingest.readers import CsvSource

    reader = CsvSource(storage, uri)
    with reader.open():
        header = list(reader.header)
    if source.kind == "met_csv":
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ArtsimError(f"{key}.path: {uri} is not a MetObjects.csv: no column {missing[0]!r} "
                              f"(header starts {header[:5]})")
    return header


def _csv_range(storage: Storage, source, key: str, uri: str, start: int, end: int,
               budget: Any = None) -> Iterator[dict | BadRow]:
    """The CSV records that start in [start, end), within the same row and field caps as a whole-file read
    (``budget``: artsim.ingest.readers.SourceBudget; its byte cap counts the range's bytes)."""
    from artsim.ingest.readers import _BoundedLines, _budget, csv_rows
    from artsim.ingest.met_csv import parse_met_csv
    from artsim.ingest.table import parse_table, resolve_mapping

    header = _csv_header(storage, source, key, uri)
    mapping = resolve_mapping(source.mapping, header, key, uri) if source.kind == "table" else None
    if end <= start:
        return
    raw, buffered = _open_range(storage, uri, start, end)
    try:
        stream = io.TextIOWrapper(buffered, encoding="utf-8-sig" if start == 0 else "utf-8", errors="replace",
                                  newline="")
        limits = _budget(budget).limits
        csv.field_size_limit(limits.max_field_chars)  # process-wide, as CsvSource sets it
        lines = _BoundedLines(stream, limits.max_row_chars)
        delimiter = "\t" if uri.lower().removesuffix(".gz").endswith(".tsv") else ","
        reader = csv.reader(lines, delimiter=delimiter)
        if start == 0:
            next(reader, None)  # the header
        rows = csv_rows(reader, header, lines, f" after byte {start}" if start else "")
        yield from (parse_met_csv(rows, source.collection) if mapping is None
                    else parse_table(rows, source.collection, mapping))
    finally:
        raw.close()


def _lines(storage: Storage, uri: str, start: int, end: int,
           max_chars: Optional[int] = None) -> Iterator[tuple[str, bytes | None]]:
    """The lines that start in [start, end) (the last one read to its end, past ``end``). A line over
    ``max_chars`` bytes is skipped to its end a piece at a time and given as None (never held in memory)."""
    fs, path = storage.fs(uri)
    with fs.open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # up to the first line start at or after `start`
        number = 0
        while pos < end:
            line = f.readline(max_chars + 1) if max_chars else f.readline()
            if not line:
                return
            pos += len(line)
            if max_chars and len(line) > max_chars:
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                    pos += len(line)
                line = None
            number += 1
            yield f"line {number} after byte {start}" if start else f"line {number}", line


def _parse_json_lines(lines: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, Any]]:
    for position, line in lines:
        if line is None:
            yield position, BadRow(position, "longer than ingest.max_row_chars")
            continue
        text = line.decode("utf-8", errors="replace").lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            yield position, BadRow(position, f"not valid JSON: {exc}")
            continue
        yield position, row


def _jsonl_range(storage: Storage, source, key: str, uri: str, start: int, end: int,
                 budget: Any = None) -> Iterator[dict | BadRow]:
    from artsim.ingest.readers import _budget

    rows = _parse_json_lines(_lines(storage, uri, start, end, _budget(budget).limits.max_row_chars))
    if source.kind == "table":
        yield from _table_rows(storage, source, key, uri, rows)
        return
    yield from _parse_items(source, ((p, r) for p, r in rows))


def _table_rows(storage: Storage, source, key: str, uri: str, rows) -> Iterator[dict | BadRow]:
    """JSON rows of a table source; the mapping is resolved from the keys of the file's first 1000 rows (as for a
    whole file), so every range of the file agrees on it."""
    from artsim.ingest.readers import json_line_rows
    from artsim.ingest.table import parse_table, resolve_mapping

    columns: dict[str, None] = {}
    for n, (_, row) in enumerate(json_line_rows(storage, uri)):
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
        if n >= 999:
            break
    mapping = resolve_mapping(source.mapping, columns, key, uri)
    checked = ((p, r if isinstance(r, (dict, BadRow)) else BadRow(p, "not a JSON object")) for p, r in rows)
    yield from parse_table(checked, source.collection, mapping)


def _parse_items(source, rows: Iterator[tuple[str, Any]]) -> Iterator[dict | BadRow]:
    """Items of a JSON-kind source handed to its parser ``ITEMS_PER_PARSE`` at a time (as a JSON list)."""
    from artsim.ingest.stage import JSON_PARSERS

    parser = JSON_PARSERS[source.kind]
    chunk: list = []
    for _, item in rows:
        if isinstance(item, BadRow):
            yield item
            continue
        chunk.append(item)
        if len(chunk) >= ITEMS_PER_PARSE:
            yield from parser(chunk, source.collection)
            chunk = []
    if chunk:
        yield from parser(chunk, source.collection)


# -- one big JSON document, streamed ---------------------------------------------------------------------------------

ITEM_KEYS = {"met_api_json": ("objects", "items"), "smk_json": ("items",), "europeana_json": ("items",)}


def _item_prefix(f, keys: tuple[str, ...]) -> str | None:
    """ijson prefix of the item array: ``item`` for a top-level list, ``<key>.item`` for the first of ``keys``
    that holds a list; None when the document has neither (it is then small or not a collection)."""
    import ijson

    depth_key = None
    for prefix, event, value in ijson.parse(f):
        if prefix == "" and event == "start_array":
            return "item"
        if prefix == "" and event == "map_key":
            depth_key = value
        elif prefix == depth_key and event == "start_array" and depth_key in keys:
            return f"{depth_key}.item"
        elif prefix == "" and event == "end_map":
            return None
    return None


def _json_stream(storage: Storage, source, key: str, uri: str) -> Iterator[dict | BadRow]:
    import ijson

    from artsim.ingest.readers import open_binary

    if source.kind == "table":
        keys: tuple[str, ...] = ()
    else:
        keys = ITEM_KEYS.get(source.kind, ("items",))
    try:
        with open_binary(storage, uri) as f:
            prefix = _item_prefix(f, keys)
    except ijson.common.IncompleteJSONError:
        prefix = None
        trailing = True
    else:
        trailing = False
    if prefix is None:
        if trailing:  # not one document: JSON lines under a .json name; stream them line by line
            yield from _streamed_lines(storage, source, key, uri)
            return
        from artsim.ingest.stage import read_file  # an object without an item list: small, read whole

        yield from read_file(storage, source, key, uri)
        return
    with open_binary(storage, uri) as f:
        items = ((f"[{i}]", item) for i, item in enumerate(ijson.items(f, prefix, use_float=True)))
        try:
            if source.kind == "table":
                yield from _table_rows(storage, source, key, uri, items)
            else:
                yield from _parse_items(source, items)
        except ijson.common.IncompleteJSONError as exc:
            raise ArtsimError(f"{uri}: not valid JSON: {exc}") from None


def _streamed_lines(storage: Storage, source, key: str, uri: str) -> Iterator[dict | BadRow]:
    from artsim.ingest.readers import open_binary

    def lines():
        with open_binary(storage, uri) as f:
            for number, line in enumerate(f, 1):
                yield f"line {number}", line

    rows = _parse_json_lines(lines())
    if source.kind == "table":
        yield from _table_rows(storage, source, key, uri, rows)
    else:
        yield from _parse_items(source, rows)


__all__ = ["read_segment", "csv_record_starts", "JSON_KINDS"]
