"""Planning an ingest: plain functions and dataclasses, no Ray, no reading of records (tested directly).

``plan_ingest`` turns the configured sources and their file listing (URI, size, format) into *pieces*, the unit of
work of one Ray task, in the order that decides which duplicate wins (source order, then file order, then byte
order inside a file):

* small files are grouped into one piece (up to ``piece_bytes`` and ``MAX_FILES_PER_PIECE`` files);
* an uncompressed CSV or JSON-lines file larger than ``piece_bytes`` is cut into byte ranges (``csv_range``,
  ``jsonl_range``); the reader of a range owns exactly the records that *start* inside it (CSV: at a newline outside
  quotes, found by one scan of the file; JSON lines: at a newline);
* one JSON document larger than ``json_memory_bytes`` (or any gzip-compressed one over an eighth of it) is streamed
  item by item in its own piece (``json_stream``) instead of being parsed whole;
* a ``europeana_api`` source is one piece per query partition (``api``).

``group_parts`` decides, once the duplicates are known, which pieces go into which ``records/part-NNNNN.parquet``
files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PIECE_BYTES = 64 * 2**20  # source bytes per piece: ~100k-200k records, a few hundred MB of Python objects at most
JSON_MEMORY_BYTES = 64 * 2**20  # a JSON document up to this size is parsed whole; larger ones are streamed
MAX_FILES_PER_PIECE = 500  # small files grouped into one task (IIIF manifests, one JSON per object)
BUCKET_SOURCE_BYTES = 512 * 2**20  # source bytes per duplicate-finding bucket (~0.5-1M ids per bucket task)
MAX_BUCKETS = 512
ROWS_PER_FILE = 250_000  # rows per Parquet file of records/

API_KINDS = ("europeana_api",)
JSON_KINDS = ("met_api_json", "smk_json", "europeana_json")


@dataclass(frozen=True)
class Segment:
    """A part of one source file that one piece reads."""
    uri: str
    mode: str  # whole | csv_range | jsonl_range | json_stream | api
    start: int = 0  # byte range [start, end) for *_range modes; for api: the partition number
    end: int = -1
    cut: int = -1  # csv_range: which range of the file (its exact bounds are resolved by one scan of the file)


@dataclass(frozen=True)
class Piece:
    index: int  # global order: earlier pieces win duplicate ids
    source: int  # index into the config's sources
    segments: tuple[Segment, ...]
    nbytes: int = 0


@dataclass(frozen=True)
class SourceFile:
    """One file of a source as the driver lists it (no content read, except 4 KB to sniff a large table file)."""
    uri: str
    size: int
    fmt: str  # csv | jsonl | json | parquet | other
    gzip: bool = False


@dataclass
class IngestPlan:
    pieces: list[Piece]
    files_per_source: list[int]
    csv_cuts: dict[str, list[int]]  # file URI -> nominal cut offsets (the scan moves each to a record start)
    buckets: int  # hash buckets for duplicate finding
    total_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def format_of_name(uri: str) -> tuple[str, bool]:
    """(format, gzip) from a file name: csv, jsonl, json, parquet or other."""
    name = uri.lower()
    gz = name.endswith(".gz")
    name = name.removesuffix(".gz")
    for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                     (".json", "json"), (".csv", "csv"), (".tsv", "csv")):
        if name.endswith(ext):
            return fmt, gz
    return "other", gz


def split_mode(kind: str, f: SourceFile, piece_bytes: int, json_memory_bytes: int) -> str:
    """How one file is read: whole (possibly grouped with others), cut in ranges, or streamed."""
    if kind == "iiif_manifest":
        return "whole"  # manifests are small documents; a collection manifest is read whole by the IIIF parser
    fmt = "csv" if kind == "met_csv" else f.fmt
    if not f.gzip and f.size > piece_bytes and fmt in ("csv", "jsonl"):
        return f"{fmt}_range"
    if fmt == "json" or (kind in JSON_KINDS and fmt not in ("csv", "parquet", "jsonl")):
        limit = json_memory_bytes // 8 if f.gzip else json_memory_bytes
        if f.size > limit:
            return "json_stream"
    return "whole"


def plan_ingest(sources, listing: dict[int, list[SourceFile]], *, piece_bytes: int = PIECE_BYTES,
                json_memory_bytes: int = JSON_MEMORY_BYTES, buckets: Optional[int] = None,
                api_partitions: Optional[dict[int, int]] = None) -> IngestPlan:
    """Pieces for every source. ``listing[i]``: the files of file-based source ``i``; ``api_partitions[i]``: the
    number of query partitions of API source ``i``."""
    if piece_bytes < 1 or json_memory_bytes < 1:
        raise ValueError("piece_bytes and json_memory_bytes must be positive")
    pieces: list[Piece] = []
    cuts: dict[str, list[int]] = {}
    files_per_source: list[int] = []
    total = 0

    def add(source: int, segments: list[Segment], nbytes: int) -> None:
        pieces.append(Piece(len(pieces), source, tuple(segments), nbytes))

    for i, source in enumerate(sources):
        if source.kind in API_KINDS:
            files_per_source.append(0)
            for part in range((api_partitions or {}).get(i, 1)):
                add(i, [Segment(source.path, "api", part)], 0)
            continue
        files = listing.get(i, [])
        files_per_source.append(len(files))
        group: list[Segment] = []
        group_bytes = 0
        for f in files:
            total += f.size
            mode = split_mode(source.kind, f, piece_bytes, json_memory_bytes)
            if mode == "whole":
                if group and (group_bytes + f.size > piece_bytes or len(group) >= MAX_FILES_PER_PIECE):
                    add(i, group, group_bytes)
                    group, group_bytes = [], 0
                group.append(Segment(f.uri, "whole"))
                group_bytes += f.size
                continue
            if group:  # keep file order: the pending group goes first
                add(i, group, group_bytes)
                group, group_bytes = [], 0
            if mode == "json_stream":
                add(i, [Segment(f.uri, "json_stream")], f.size)
                continue
            bounds = list(range(0, f.size, piece_bytes)) + [f.size]
            if mode == "csv_range":
                cuts[f.uri] = bounds
            for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
                add(i, [Segment(f.uri, mode, start, end, k if mode == "csv_range" else -1)], end - start)
        if group:
            add(i, group, group_bytes)
    if buckets is None:
        buckets = max(1, min(MAX_BUCKETS, -(-total // BUCKET_SOURCE_BYTES)))
    return IngestPlan(pieces, files_per_source, cuts, max(1, int(buckets)), total)


@dataclass(frozen=True)
class PartGroup:
    """Consecutive pieces written by one task as ``part-<first_part>.parquet`` ... (``parts`` files)."""
    pieces: tuple[int, ...]
    first_part: int
    parts: int
    rows: int


def group_parts(kept_rows: list[int], rows_per_file: int = ROWS_PER_FILE,
                parsed_rows: Optional[list[int]] = None) -> list[PartGroup]:
    """Pieces (by their kept row counts, in piece order) -> writing tasks. Consecutive pieces share a task while
    their rows fit in one file; a bigger piece gets a task of its own with several files. A piece whose records
    were all duplicates still goes to a task (``parsed_rows`` > 0), which counts what it dropped. With no rows at
    all, one task writes one empty file (records/ always has a part file with the schema)."""
    groups: list[PartGroup] = []
    current: list[int] = []
    current_rows = 0
    next_part = 0

    def close() -> None:
        nonlocal current, current_rows, next_part
        parts = max(1, -(-current_rows // rows_per_file))
        groups.append(PartGroup(tuple(current), next_part, parts, current_rows))
        next_part += parts
        current, current_rows = [], 0

    for piece, rows in enumerate(kept_rows):
        if rows == 0 and not (parsed_rows and parsed_rows[piece]):
            continue
        if current and current_rows + rows > rows_per_file:
            close()
        current.append(piece)
        current_rows += rows
    if current or not groups:
        close()
    return groups
