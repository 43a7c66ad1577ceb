"""Ingest: every configured source → canonical records → ``records/`` (Parquet) + ``records/_report.json``.

One module per format turns a source's parsed data into record dicts (``met_api``, ``met_csv``, ``smk``,
``europeana``, ``iiif``, ``table``); this module reads the sources, applies the per-source options
(``image_url_template``, default ``license``), drops duplicate ids (first one wins), counts what went wrong, and
writes the output atomically. Duplicates, records without an image URL and unparsable rows are counted and
reported, never fatal; a missing source file or a mapping that names a missing column is a user error naming the
config key. The work is I/O- and parse-bound on the driver (no Ray needed): it streams, so memory stays bounded by
the Arrow table of the output.
"""
from __future__ import annotations

import os
import posixpath
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import quote

import pyarrow as pa

from artsim.config import SourceConfig
from artsim.console import Progress, say
from artsim.console import table as print_table  # not "table": that name is the artsim.ingest.table module
from artsim.errors import ArtsimError, ConfigError
from artsim.ingest.common import BadRow
from artsim.ingest.europeana import parse_europeana
from artsim.ingest.iiif import parse_iiif
from artsim.ingest.licenses import license_allowed, normalize_license
from artsim.ingest.met_api import parse_met_api
from artsim.ingest.met_csv import REQUIRED_COLUMNS as MET_CSV_REQUIRED, parse_met_csv
from artsim.ingest.readers import (
    CsvSource, ReadLimits, SourceBudget, check_regular_file, json_line_rows, parquet_columns, parquet_rows,
    read_json_document, sniff_format, source_files,
)
from artsim.ingest.smk import parse_smk
from artsim.ingest.table import parse_table, resolve_mapping
from artsim.rundir.schema import RECORD_FIELDS, records_table
from artsim.storage import Storage, join

__all__ = ["run_ingest", "ingest_sources", "read_source", "SourceStats", "normalize_license", "license_allowed"]

JSON_PARSERS: dict[str, Callable[[Any, str], Iterable]] = {
    "met_api_json": parse_met_api,
    "smk_json": parse_smk,
    "europeana_json": parse_europeana,
    "iiif_manifest": parse_iiif,
}
TEMPLATE_EXTRA_FIELDS = ("source_dir",)  # besides the canonical fields
MAX_EXAMPLES = 5  # unparsable-row reasons kept per source in the report
BATCH_ROWS = 50_000  # records converted to Arrow at a time (bounds the Python-object memory)
ROWS_PER_FILE = 250_000  # rows per Parquet file of records/


@dataclass
class SourceStats:
    """Counts for one source (or the total) as they appear in ``records/_report.json``."""

    source: str  # "sources.0" or "total"
    kind: str = ""
    path: str = ""
    collection: str = ""
    files: int = 0
    rows_read: int = 0  # items seen: records + unparsable rows
    records_written: int = 0
    duplicate_ids: int = 0
    missing_image_url: int = 0
    unparsable_rows: int = 0
    unparsable_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: "SourceStats") -> None:
        for name in ("files", "rows_read", "records_written", "duplicate_ids", "missing_image_url",
                     "unparsable_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.unparsable_examples = (self.unparsable_examples + [f"{other.source}: {e}" for e in
                                                                 other.unparsable_examples])[:MAX_EXAMPLES]
        self.duplicate_examples = (self.duplicate_examples + other.duplicate_examples)[:MAX_EXAMPLES]


# ---------------------------------------------------------------------------------------------------------------
# Reading one source


def read_source(storage: Storage, source: SourceConfig, key: str, limits: ReadLimits | None = None
                ) -> Iterator[tuple[str, dict | BadRow]]:
    """(file URI, record | BadRow) for every item of a source, with the source's options applied.

    ``key`` is the source's config path (``sources.N``), used in error messages; ``limits`` bound the reading
    (``ingest`` config section; default: its defaults).
    """
    check_template(source, key)
    budget = SourceBudget(limits, f"{key}.path")
    for uri in source_files(storage, source.path, f"{key}.path"):
        source_dir = posixpath.dirname(uri) if uri.startswith("s3://") else posixpath.dirname(_local_path(uri))
        for item in _parse_file(storage, source, key, uri, budget):
            if isinstance(item, dict):
                _apply_options(item, source, source_dir)
            yield uri, item


def read_file(storage: Storage, source: SourceConfig, key: str, uri: str,
              budget: Optional[SourceBudget] = None) -> Iterator[dict | BadRow]:
    """Every item of one whole file of a source, with the source's options applied, read within ``budget``'s
    limits (an ingest piece reads its ``whole`` files through this)."""
    source_dir = posixpath.dirname(uri) if uri.startswith("s3://") else posixpath.dirname(_local_path(uri))
    for item in _parse_file(storage, source, key, uri, budget or SourceBudget(key=f"{key}.path")):
        if isinstance(item, dict):
            _apply_options(item, source, source_dir)
        yield item


def _parse_file(storage: Storage, source: SourceConfig, key: str, uri: str, budget: SourceBudget
                ) -> Iterator[dict | BadRow]:
    if source.kind in JSON_PARSERS:
        data, bad_lines = read_json_document(storage, uri, budget)
        yield from bad_lines
        yield from JSON_PARSERS[source.kind](data, source.collection)
        return
    if source.kind == "met_csv":
        csv_source = CsvSource(storage, uri, budget)
        with csv_source.open() as rows:
            missing = [c for c in MET_CSV_REQUIRED if c not in csv_source.header]
            if missing:
                raise ArtsimError(f"{key}.path: {uri} is not a MetObjects.csv: no column {missing[0]!r} "
                                  f"(header starts {csv_source.header[:5]})")
            yield from parse_met_csv(rows, source.collection)
        return
    if source.kind == "table":
        yield from _parse_table_file(storage, source, key, uri, budget)
        return
    raise ConfigError(f"{key}.kind", f"unsupported source kind {source.kind!r}")  # config validation prevents this


def _parse_table_file(storage: Storage, source: SourceConfig, key: str, uri: str, budget: SourceBudget
                      ) -> Iterator[dict | BadRow]:
    fmt = sniff_format(storage, uri, budget)
    if fmt == "csv":
        csv_source = CsvSource(storage, uri, budget)
        with csv_source.open() as rows:
            mapping = resolve_mapping(source.mapping, csv_source.header, key, uri)
            yield from parse_table(rows, source.collection, mapping)
    elif fmt == "parquet":
        mapping = resolve_mapping(source.mapping, parquet_columns(storage, uri, budget), key, uri)
        columns = sorted(set(mapping.values()))
        yield from parse_table(parquet_rows(storage, uri, columns, budget=budget), source.collection, mapping)
    else:  # JSON lines, or a JSON array of row objects
        rows = json_line_rows(storage, uri, budget)
        head: list = []
        for item in rows:  # the columns of JSON rows are the keys seen in the first rows
            head.append(item)
            if len(head) >= 1000:
                break
        columns: dict[str, None] = {}
        for _, row in head:
            if isinstance(row, dict):
                columns.update(dict.fromkeys(row))
        mapping = resolve_mapping(source.mapping, columns, key, uri)
        yield from parse_table(_chain(head, rows), source.collection, mapping)


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def _local_path(uri: str) -> str:
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def check_template(source: SourceConfig, key: str) -> None:
    """Reject an ``image_url_template`` that names unknown fields before reading anything."""
    if not source.image_url_template:
        return
    allowed = set(RECORD_FIELDS) | set(TEMPLATE_EXTRA_FIELDS)
    try:
        parsed = list(string.Formatter().parse(source.image_url_template))
    except ValueError as exc:
        raise ConfigError(f"{key}.image_url_template", f"not a valid template: {exc}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        # Plain field names only: "{local_id.__class__}" or "{subjects[0]}" would let a config reach into objects.
        if name not in allowed:
            raise ConfigError(f"{key}.image_url_template",
                              f"unknown field {{{name}}} (use record fields such as {{local_id}}, {{collection}}, "
                              f"or {{source_dir}})")


def _apply_options(record: dict, source: SourceConfig, source_dir: str) -> None:
    if source.image_url_template:
        values: dict[str, str] = {}
        usable = True
        for _, name, _, _ in string.Formatter().parse(source.image_url_template):
            if name is None:
                continue
            if name == "source_dir":
                values[name] = source_dir
                continue
            value = record.get(name)
            if value is None or value == "" or value == []:
                usable = False  # a template with a hole would point at a wrong file
                break
            # Values are quoted as one URL path segment: an id like "KKSgb6775/3" must not add a directory.
            values[name] = quote(str(value), safe="")
        record["image_url"] = source.image_url_template.format(**values) if usable else None
    if record.get("license") is None and source.license:
        record["license"] = normalize_license(source.license)


# ---------------------------------------------------------------------------------------------------------------
# All sources -> one table


def ingest_sources(storage: Storage, sources: list[SourceConfig], progress_interval: float = 5.0,
                   limits: ReadLimits | None = None) -> tuple[pa.Table, list[SourceStats], SourceStats, Counter]:
    """Read every source; return (records table, per-source stats, total stats, licence counts)."""
    seen: set[str] = set()
    batches: list[pa.Table] = []
    pending: list[dict] = []
    per_source: list[SourceStats] = []
    total = SourceStats(source="total")
    licenses: Counter = Counter()
    for i, source in enumerate(sources):
        key = f"sources.{i}"
        stats = SourceStats(source=key, kind=source.kind, path=source.path, collection=source.collection)
        start = time.perf_counter()
        progress = Progress(f"ingest {key} ({source.kind})", unit="rows", interval=progress_interval)
        files = set()
        for uri, item in read_source(storage, source, key, limits):
            files.add(uri)
            stats.rows_read += 1
            progress.update()
            if isinstance(item, BadRow):
                stats.unparsable_rows += 1
                if len(stats.unparsable_examples) < MAX_EXAMPLES:
                    stats.unparsable_examples.append(f"{posixpath.basename(uri)} {item}")
                continue
            if item["object_id"] in seen:
                stats.duplicate_ids += 1
                if len(stats.duplicate_examples) < MAX_EXAMPLES:
                    stats.duplicate_examples.append(item["object_id"])
                continue
            seen.add(item["object_id"])
            if not item.get("image_url"):
                stats.missing_image_url += 1
            licenses[item.get("license") or "unknown"] += 1
            stats.records_written += 1
            pending.append(item)
            if len(pending) >= BATCH_ROWS:
                batches.append(records_table(pending))
                pending = []
        stats.files = len(files)
        stats.seconds = round(time.perf_counter() - start, 3)
        if stats.records_written == 0:
            say(f"warning: {key} ({source.path}) produced no records")
        per_source.append(stats)
        total.add(stats)
    if pending or not batches:
        batches.append(records_table(pending))
    return pa.concat_tables(batches), per_source, total, licenses


def list_source_files(storage: Storage, source: SourceConfig, key: str) -> list:
    """The files of a file-based source with their sizes (one listing per directory, no content read except
    4 KB to sniff the format of a large file whose name does not say it)."""
    from artsim.ingest.plan import PIECE_BYTES, SourceFile, format_of_name

    uris = source_files(storage, source.path, f"{key}.path")
    for uri in uris:  # on the driver, before any task: a FIFO or a device is a user error, not a hung worker
        check_regular_file(storage, uri, f"{key}.path")
    sizes: dict[str, int] = {}
    by_dir: dict[str, list[str]] = {}
    for uri in uris:
        by_dir.setdefault(posixpath.dirname(uri), []).append(uri)
    for directory, members in by_dir.items():
        fs, _ = storage.fs(members[0])
        if len(members) == 1:
            sizes[members[0]] = int(fs.size(storage.fs(members[0])[1]) or 0)
            continue
        listed = {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                  for e in fs.ls(storage.fs(directory)[1], detail=True)}
        for uri in members:
            sizes[uri] = listed.get(posixpath.basename(uri), 0)
    files = []
    for uri in uris:
        fmt, gz = format_of_name(uri)
        if fmt == "other" and source.kind == "table" and sizes[uri] > PIECE_BYTES:
            fmt = sniff_format(storage, uri)
        files.append(SourceFile(uri, sizes[uri], fmt, gz))
    return files


def run_ingest(ctx, piece_bytes: int | None = None, json_memory_bytes: int | None = None,
               buckets: int | None = None, rows_per_file: int | None = None) -> dict:
    """Stage entry point: read ``ctx.config.sources`` and write ``records/`` plus ``records/_report.json``.

    The driver lists the sources and plans pieces (artsim/ingest/plan.py); Ray tasks parse them, find duplicate ids
    and write the part files (artsim/ingest/execute.py); the driver holds only per-piece counts. The keyword
    options override the planning sizes (tests and benchmarks use small ones to exercise the splitting).
    """
    from artsim.ingest import execute
    from artsim.ingest.plan import JSON_MEMORY_BYTES, PIECE_BYTES, ROWS_PER_FILE, plan_ingest
    from artsim.runtime import cluster_line, ensure_ray

    sources = ctx.config.sources
    if not sources:
        raise ConfigError("sources", "no sources configured (add at least one entry)")
    start = time.perf_counter()
    listing = {}
    api_partitions: dict[int, int] = {}
    api_context: dict = {"run_root": ctx.paths.root, "sources": {}, "stats": {}}
    for i, source in enumerate(sources):
        key = f"sources.{i}"
        check_template(source, key)
        if source.kind == "europeana_api":
            from artsim.ingest.europeana_api import prepare_harvest

            api_context["sources"][i] = prepare_harvest(ctx.storage, source, key, ctx.paths.root)
            api_partitions[i] = len(api_context["sources"][i]["partitions"])
        else:
            listing[i] = list_source_files(ctx.storage, source, key)
    rows_per_file = rows_per_file or ROWS_PER_FILE
    plan = plan_ingest(sources, listing, piece_bytes=piece_bytes or PIECE_BYTES,
                       json_memory_bytes=json_memory_bytes or JSON_MEMORY_BYTES, buckets=buckets,
                       api_partitions=api_partitions)
    del listing
    say(f"ingest: {len(sources)} source(s), {sum(plan.files_per_source)} file(s), {plan.total_bytes / 1e6:.1f} MB "
        f"-> {len(plan.pieces)} piece(s), {plan.buckets} duplicate bucket(s)")
    ensure_ray(ctx.config)
    say(f"ingest: {cluster_line()}")
    uri = ctx.paths.records
    # Data files and the report appear together: the directory counts as complete only with its _SUCCESS marker.
    with ctx.storage.atomic_dir(uri) as staging:
        work = join(staging, "_work")
        try:
            outcome = execute.run(plan, sources, ctx.config.storage, work, staging, rows_per_file, api_context,
                                  limits=ReadLimits.from_config(ctx.config.ingest))
        finally:
            ctx.storage.delete(work)
        per_source, total, licenses, collections = _summarize(sources, plan, outcome)
        seconds = time.perf_counter() - start
        report = {
            "records_uri": uri,
            "seconds": round(seconds, 3),
            "rows_per_second": round(total.rows_read / seconds, 1) if seconds > 0 else None,
            "pieces": len(plan.pieces),
            **outcome.seconds,
            "sources": [asdict(s) for s in per_source],
            "total": {k: v for k, v in asdict(total).items() if k not in ("kind", "path", "collection", "source")},
            "licenses": dict(licenses.most_common()),
            "collections": dict(collections.most_common()),
        }
        for i, entry in enumerate(report["sources"]):
            harvest = [s for s in outcome.piece_stats if s["source"] == i and sources[i].kind == "europeana_api"]
            if harvest:
                entry["pages"] = sum(s["pages"] for s in harvest)
                entry["total_results"] = [s["total_results"] for s in harvest]
        ctx.storage.write_json(join(staging, "_report.json"), report)
    for s in per_source:
        if s.records_written == 0:
            say(f"warning: {s.source} ({s.path}) produced no records")
    print_table(["source", "kind", "collection", "rows read", "records", "duplicates", "no image url", "unparsable"],
          [(s.source, s.kind, s.collection, s.rows_read, s.records_written, s.duplicate_ids, s.missing_image_url,
            s.unparsable_rows) for s in per_source]
          + [("total", "", "", total.rows_read, total.records_written, total.duplicate_ids,
              total.missing_image_url, total.unparsable_rows)])
    for s in per_source:
        for example in s.unparsable_examples[:3]:
            say(f"{s.source} unparsable: {example}")
    say(f"ingest: {total.records_written} records from {len(sources)} source(s) in {seconds:.1f}s "
        f"({report['rows_per_second']} rows/s) -> {uri} (report: {ctx.paths.ingest_report})")
    return {
        "records": total.records_written,
        "rows_read": total.rows_read,
        "duplicate_ids": total.duplicate_ids,
        "missing_image_url": total.missing_image_url,
        "unparsable_rows": total.unparsable_rows,
        "sources": len(sources),
        "pieces": len(plan.pieces),
        "seconds": round(seconds, 3),
        "rows_per_second": report["rows_per_second"],
        "records_uri": uri,
        "report_uri": ctx.paths.ingest_report,
    }


def _summarize(sources, plan, outcome) -> tuple[list[SourceStats], SourceStats, Counter, Counter]:
    """Per-source and total counts from the per-piece and per-group results (exact: every row is in one piece)."""
    per_source = [SourceStats(source=f"sources.{i}", kind=s.kind, path=s.path, collection=s.collection,
                              files=plan.files_per_source[i]) for i, s in enumerate(sources)]
    for piece, stats, dropped in zip(plan.pieces, outcome.piece_stats, outcome.drops):
        s = per_source[piece.source]
        s.rows_read += stats["rows_read"]
        s.unparsable_rows += stats["unparsable_rows"]
        s.duplicate_ids += dropped
        s.seconds += stats["seconds"]
        s.unparsable_examples = (s.unparsable_examples + stats["unparsable_examples"])[:MAX_EXAMPLES]
    licenses: Counter = Counter()
    collections: Counter = Counter()
    for group in outcome.groups:  # in part order = piece order
        for i, counts in sorted(group["per_source"].items()):
            s = per_source[int(i)]
            s.records_written += counts["written"]
            s.missing_image_url += counts["missing_image_url"]
            s.duplicate_examples = (s.duplicate_examples + counts["duplicate_examples"])[:MAX_EXAMPLES]
            licenses.update(counts["licenses"])
            collections.update(counts["collections"])
    total = SourceStats(source="total")
    for s in per_source:
        s.seconds = round(s.seconds, 3)
        total.add(s)
    return per_source, total, licenses, collections
