"""Carrying out an ingest plan: three passes of tasks that read and write storage themselves; the driver passes
plans and small per-piece counts, never records.

1. **parse** (one task per piece): read the piece's sources, write its records in source order to
   ``<work>/pieces/piece-NNNNNN.parquet`` and each record's (object_id, row) to the hash bucket of its id,
   ``<work>/ids/bBBBB/piece-NNNNNN.parquet``; return the counts (rows read, unparsable rows and examples);
2. **duplicates** (one task per bucket): all occurrences of an id are in one bucket; the first one in piece order,
   then row order, wins — the same rule as reading everything in order on one machine. The others go to
   ``<work>/drops/bBBBB.parquet`` as (piece, row); the task returns how many each piece lost;
3. **write** (one task per group of pieces, see plan.group_parts): the pieces' records minus their dropped rows
   become ``part-NNNNN.parquet`` files (numbered in piece order), with the exact per-source counts of what was kept
   (missing image URLs, licences, collections) and the first duplicate ids.

The functions are plain (``parse_piece``, ``find_duplicates``, ``write_group``) and tested without Ray; ``run``
is the Ray wiring. Every task writes whole files under the stage's staging directory, so a retried task rewrites
the same names and the commit (``Storage.atomic_dir``) publishes nothing until every pass is done.
"""
from __future__ import annotations

import posixpath
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from artsim.ingest.common import BadRow
from artsim.ingest.plan import IngestPlan, PartGroup, Piece, group_parts
from artsim.rundir.schema import RECORDS_SCHEMA, records_table
from artsim.storage import Storage, join

BATCH_ROWS = 50_000  # records converted to Arrow at a time (bounds a task's Python-object memory)
MAX_EXAMPLES = 5
IDS_SCHEMA = pa.schema([("object_id", pa.string()), ("row", pa.int64())])
DROPS_SCHEMA = pa.schema([("piece", pa.int32()), ("row", pa.int64())])


def bucket_of(object_id: str, buckets: int) -> int:
    """A stable hash bucket (the same in every process, unlike ``hash``)."""
    return zlib.crc32(object_id.encode("utf-8")) % buckets


def piece_name(index: int) -> str:
    return f"piece-{index:06d}.parquet"


class _ParquetOut:
    """A Parquet file written batch by batch to any storage URI (opened on the first batch)."""

    def __init__(self, storage: Storage, uri: str, schema: pa.Schema):
        self.storage, self.uri, self.schema = storage, uri, schema
        self.writer: Optional[pq.ParquetWriter] = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            fs, path = self.storage.arrow_fs(self.uri)
            fs.create_dir(posixpath.dirname(path), recursive=True)
            self.writer = pq.ParquetWriter(path, self.schema, filesystem=fs, compression="zstd")
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self, always: bool = False) -> None:
        if self.writer is None and always:
            self.write(self.schema.empty_table())
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# -- pass 1 -------------------------------------------------------------------------------------------------------


def parse_piece(storage: Storage, sources, piece: Piece, work_uri: str, buckets: int,
                csv_bounds: Optional[dict] = None, api_context: Any = None, limits=None) -> dict:
    """Read one piece; write its records and its ids (by bucket). Returns the piece's counts. ``limits``
    (artsim.ingest.readers.ReadLimits): the byte cap applies per piece, row/field caps and the read deadline per
    read."""
    from artsim.ingest.pieces import read_segment
    from artsim.ingest.readers import SourceBudget

    start = time.perf_counter()
    source = sources[piece.source]
    key = f"sources.{piece.source}"
    records_out = _ParquetOut(storage, join(work_uri, "pieces", piece_name(piece.index)), RECORDS_SCHEMA)
    id_lists: list[list[str]] = [[] for _ in range(buckets)]
    row_lists: list[list[int]] = [[] for _ in range(buckets)]
    pending: list[dict] = []
    stats = {"piece": piece.index, "source": piece.source, "rows_read": 0, "records": 0, "unparsable_rows": 0,
             "unparsable_examples": [], "pages": 0, "total_results": None}
    row = 0
    for segment in piece.segments:
        bounds = (csv_bounds or {}).get((segment.uri, segment.cut)) if segment.mode == "csv_range" else None
        name = posixpath.basename(segment.uri) if segment.mode != "api" else f"partition {segment.start}"
        budget = SourceBudget(limits, f"{key}.path")
        for item in read_segment(storage, source, key, segment, bounds, api_context, budget):
            stats["rows_read"] += 1
            if isinstance(item, BadRow):
                stats["unparsable_rows"] += 1
                if len(stats["unparsable_examples"]) < MAX_EXAMPLES:
                    stats["unparsable_examples"].append(f"{name} {item}")
                continue
            oid = item["object_id"]
            b = bucket_of(oid, buckets)
            id_lists[b].append(oid)
            row_lists[b].append(row)
            row += 1
            pending.append(item)
            if len(pending) >= BATCH_ROWS:
                records_out.write(records_table(pending))
                pending = []
        if segment.mode == "api" and isinstance(api_context, dict):
            harvest = api_context.get("stats", {}).get((piece.source, segment.start), {})
            stats["pages"] += harvest.get("pages", 0)
            if harvest.get("total_results") is not None:
                stats["total_results"] = harvest["total_results"]
    if pending:
        records_out.write(records_table(pending))
    records_out.close(always=True)
    for b in range(buckets):
        if id_lists[b]:
            table = pa.table({"object_id": pa.array(id_lists[b], pa.string()),
                              "row": pa.array(row_lists[b], pa.int64())})
            storage.write_parquet_file(table, join(work_uri, "ids", f"b{b:04d}", piece_name(piece.index)))
    stats["records"] = row
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return stats


# -- pass 2 -------------------------------------------------------------------------------------------------------


def find_duplicates(storage: Storage, work_uri: str, bucket: int) -> dict[int, int]:
    """The later occurrences of every id in one bucket -> ``drops/bBBBB.parquet``; returns {piece: rows dropped}."""
    import pyarrow.compute as pc

    bucket_uri = join(work_uri, "ids", f"b{bucket:04d}")
    names = [n for n in storage.list(bucket_uri) if n.startswith("piece-") and n.endswith(".parquet")]
    if not names:
        return {}
    tables = []
    for name in sorted(names):
        piece = int(name[len("piece-"):-len(".parquet")])
        t = storage.read_table(join(bucket_uri, name))
        tables.append(t.append_column("piece", pa.array(np.full(t.num_rows, piece, np.int32))))
    ids = pa.concat_tables(tables)
    del tables
    order = pc.sort_indices(ids, sort_keys=[("object_id", "ascending"), ("piece", "ascending"),
                                            ("row", "ascending")])
    sorted_ids = ids.take(order)
    oid = sorted_ids.column("object_id").combine_chunks()
    later = np.zeros(len(oid), dtype=bool)
    if len(oid) > 1:
        later[1:] = pc.equal(oid.slice(1), oid.slice(0, len(oid) - 1)).to_numpy(zero_copy_only=False)
    if not later.any():
        return {}
    mask = pa.array(later)
    drops = pa.table({"piece": sorted_ids.column("piece").filter(mask),
                      "row": sorted_ids.column("row").filter(mask)})
    drops = drops.sort_by([("piece", "ascending"), ("row", "ascending")])
    storage.write_parquet_file(drops, join(work_uri, "drops", f"b{bucket:04d}.parquet"))
    pieces, counts = np.unique(drops.column("piece").to_numpy(), return_counts=True)
    return {int(p): int(c) for p, c in zip(pieces, counts)}


# -- pass 3 -------------------------------------------------------------------------------------------------------


def _drops_for(storage: Storage, work_uri: str, pieces: tuple[int, ...]) -> dict[int, np.ndarray]:
    import pyarrow.compute as pc

    drops_uri = join(work_uri, "drops")
    out: dict[int, list] = {p: [] for p in pieces}
    wanted = pa.array(list(pieces), pa.int32())
    for name in storage.list(drops_uri):
        if not name.endswith(".parquet"):
            continue
        t = storage.read_table(join(drops_uri, name))
        t = t.filter(pc.is_in(t.column("piece"), value_set=wanted))
        for p, r in zip(t.column("piece").to_numpy(), t.column("row").to_numpy()):
            out[int(p)].append(int(r))
    return {p: np.sort(np.asarray(rows, dtype=np.int64)) for p, rows in out.items()}


def write_group(storage: Storage, group: PartGroup, piece_sources: dict[int, int], work_uri: str, out_uri: str,
                rows_per_file: int) -> dict:
    """Write one group's kept records as part files; returns per-source counts of what was kept and dropped."""
    drops = _drops_for(storage, work_uri, group.pieces)
    per_source: dict[int, dict] = {}
    part = group.first_part
    out = _ParquetOut(storage, join(out_uri, f"part-{part:05d}.parquet"), RECORDS_SCHEMA)
    written_files = []

    def roll() -> None:
        nonlocal out, part
        out.close()
        written_files.append(out.uri)
        part += 1
        out = _ParquetOut(storage, join(out_uri, f"part-{part:05d}.parquet"), RECORDS_SCHEMA)

    for piece in group.pieces:
        s = per_source.setdefault(piece_sources[piece], {"missing_image_url": 0, "duplicate_examples": [],
                                                          "licenses": Counter(), "collections": Counter(),
                                                          "written": 0})
        dropped = drops.get(piece, np.zeros(0, np.int64))
        first_row = 0
        for batch in storage.iter_batches(join(work_uri, "pieces", piece_name(piece)), batch_rows=BATCH_ROWS):
            rows = np.arange(first_row, first_row + batch.num_rows)
            first_row += batch.num_rows
            keep = ~np.isin(rows, dropped, assume_unique=True)
            if not keep.all() and len(s["duplicate_examples"]) < MAX_EXAMPLES:
                gone = batch.column("object_id").filter(pa.array(~keep)).to_pylist()
                s["duplicate_examples"].extend(gone[:MAX_EXAMPLES - len(s["duplicate_examples"])])
            kept = pa.Table.from_batches([batch]).filter(pa.array(keep))
            if not kept.num_rows:
                continue
            urls = kept.column("image_url")
            s["missing_image_url"] += int(urls.null_count) + sum(1 for u in urls.to_pylist() if u == "")
            s["licenses"].update(v or "unknown" for v in kept.column("license").to_pylist())
            s["collections"].update(kept.column("collection").to_pylist())
            s["written"] += kept.num_rows
            offset = 0
            while offset < kept.num_rows:  # fill the current part file up to rows_per_file
                room = rows_per_file - out.rows
                if room <= 0:
                    roll()
                    continue
                out.write(kept.slice(offset, room))
                offset += room
    out.close(always=True)
    written_files.append(out.uri)
    return {"files": written_files,
            "per_source": {i: {**v, "licenses": dict(v["licenses"]), "collections": dict(v["collections"])}
                           for i, v in per_source.items()}}


# -- the Ray layer ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    piece_stats: list[dict]  # per piece, in piece order
    drops: list[int]  # rows dropped per piece
    groups: list[dict]  # write_group results, in part order
    seconds: dict


def _unwrap(exc: BaseException) -> BaseException:
    """The user error inside a failed Ray task (bad mapping, missing column), so that it reaches the CLI as is."""
    from artsim.errors import ArtsimError

    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ArtsimError) else exc


def _gather(refs: list, progress=None, what: str = "") -> list:
    import ray

    index = {r: i for i, r in enumerate(refs)}
    out: list = [None] * len(refs)
    left = list(refs)
    try:
        while left:
            done, left = ray.wait(left, num_returns=1)
            out[index[done[0]]] = ray.get(done[0])
            if progress is not None:
                progress.update(1, what)
    except ray.exceptions.RayTaskError as exc:
        _stop(left)
        raise _unwrap(exc) from None
    return out


def _stop(refs: list, grace_s: float = 30.0) -> None:
    """Cancel ``refs`` and wait until they have ended: a task still running after the stage has failed could go on
    writing (a harvest its saved cursor) while the user already re-runs the stage."""
    import ray

    for r in refs:
        ray.cancel(r)
    _, running = ray.wait(refs, num_returns=len(refs), timeout=grace_s) if refs else ([], [])
    for r in running:  # ignored the interrupt: kill the worker process (a plain task, nothing else lives there)
        ray.cancel(r, force=True)
    for r in refs:
        try:
            ray.get(r, timeout=grace_s)
        except Exception:  # cancelled, killed or failed in its own right: the first failure is what we report
            pass


def run(plan: IngestPlan, sources, storage_config, work_uri: str, out_uri: str, rows_per_file: int,
        api_context: Any = None, progress_interval: float = 5.0, limits=None) -> Outcome:
    import ray

    from artsim.console import Progress
    from artsim.ingest.pieces import csv_record_starts

    def storage() -> Storage:
        return Storage(storage_config)

    @ray.remote(num_cpus=1)
    def resolve_task(uri, cuts):
        return csv_record_starts(storage(), uri, cuts)

    @ray.remote(num_cpus=1)
    def parse_task(piece, bounds):
        return parse_piece(storage(), sources, piece, work_uri, plan.buckets, bounds, api_context, limits)

    @ray.remote(num_cpus=1)
    def duplicates_task(bucket):
        return find_duplicates(storage(), work_uri, bucket)

    @ray.remote(num_cpus=1)
    def write_task(group, piece_sources):
        return write_group(storage(), group, piece_sources, work_uri, out_uri, rows_per_file)

    seconds = {}
    t0 = time.perf_counter()
    bounds: dict = {}
    if plan.csv_cuts:
        uris = sorted(plan.csv_cuts)
        resolved = _gather([resolve_task.remote(u, plan.csv_cuts[u]) for u in uris])
        for uri, starts in zip(uris, resolved):
            for k, (a, b) in enumerate(zip(starts, starts[1:])):
                bounds[(uri, k)] = (a, b)
    progress = Progress("ingest: parsing", total=len(plan.pieces), unit="pieces", interval=progress_interval)
    piece_stats = _gather([parse_task.remote(p, {k: v for k, v in bounds.items()
                                                 if any(s.uri == k[0] and s.cut == k[1] for s in p.segments)})
                           for p in plan.pieces], progress)
    seconds["parse_seconds"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    drops = [0] * len(plan.pieces)
    for result in _gather([duplicates_task.remote(b) for b in range(plan.buckets)]):
        for piece, n in result.items():
            drops[piece] += n
    seconds["duplicates_seconds"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    kept = [s["records"] - d for s, d in zip(piece_stats, drops)]
    groups = group_parts(kept, rows_per_file, [s["records"] for s in piece_stats])
    piece_sources = {p.index: p.source for p in plan.pieces}
    written = _gather([write_task.remote(g, {i: piece_sources[i] for i in g.pieces}) for g in groups])
    seconds["write_seconds"] = round(time.perf_counter() - t2, 3)
    return Outcome(piece_stats, drops, written, seconds)


__all__ = ["parse_piece", "find_duplicates", "write_group", "run", "bucket_of", "Outcome"]
