"""Planning the download from records/ with Ray tasks: the driver holds counts and file names, never records.

The plan is the one ``shards.plan_shards`` defines (that function stays the in-memory reference, and a test checks
that both give the same shard tasks): first occurrence of each ``object_id`` in records/ order wins; records already
in a committed shard are not fetched again; pending records sorted by sha256(object_id) are cut into shards of
``download.shard_size``, named by their first key and a digest of their ids; records committed with a status that
must be refetched go back to *their own* shard file (``replace``). Carried out in passes of plain functions, each
reading and writing whole files under a work directory (``<run.root>/_work/download-plan/``, removed when the stage ends):

1. **scatter** (one task per records/ file, one per group of committed shard files): each record goes to the bucket
   of its key, ``bucket = key[:8] * buckets >> 32``. That is a *range* partition of the key space, so bucket 0's
   keys sort before bucket 1's and the global sorted order is the buckets' sorted orders one after the other.
   Records carry their position in records/ (file index, row) for the first-occurrence rule; committed rows carry
   their status and shard file;
2. **bucket** (one task per bucket): duplicates dropped (the lowest position wins), committed ids dropped, the rest
   sorted by key into ``pending/bNNNNN.parquet``; committed rows to refetch are joined with their record and sent to
   a retry group by their shard's name. Returns counts;
3. **cut** (one task per bucket with shards starting in it): the driver turns the per-bucket counts into global
   positions; a task reads the slices of the pending files that its shards cover (a shard may run into the next
   buckets) and writes the shard tasks, one row each (``task``: ShardTask JSON), into ``tasks/new-NNNNN.parquet``;
   **retry** (one task per retry group): groups the group's rows by shard into ``tasks/retry-NNNNN.parquet``.

``download.ray_job.run_shards`` hands each worker a (task file, row group) reference; the worker reads its task. ``count_committed`` computes the
report's counts from images/ one shard file at a time (Arrow group-bys), never as one table.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artsim.download.shards import TASK_FIELDS, shard_key
from artsim.rundir.images import SHARD_PREFIX, shard_files
from artsim.storage import Storage, join

BUCKET_ROWS = 250_000  # records per bucket (a bucket task holds its bucket: ~100 MB at this size)
COMMITTED_GROUP_ROWS = 250_000  # committed rows per scatter task (estimated from download.shard_size)
SCATTER_BATCH_ROWS = 131_072

_STR = pa.string()
RECORD_SCHEMA = pa.schema([("key", _STR), ("pos", pa.int64())] + [(f, _STR) for f in TASK_FIELDS])
COMMITTED_SCHEMA = pa.schema([("object_id", _STR), ("status", _STR), ("shard", _STR)])
PENDING_SCHEMA = pa.schema([("key", _STR)] + [(f, _STR) for f in TASK_FIELDS])
RETRY_SCHEMA = pa.schema([("shard", _STR), ("key", _STR)] + [(f, _STR) for f in TASK_FIELDS])
TASKS_SCHEMA = pa.schema([("shard_id", _STR), ("records", pa.int32()), ("replace", pa.bool_()), ("task", _STR)])


def bucket_of_keys(keys: list[str], buckets: int) -> np.ndarray:
    """Range partition of sha256 hex keys: bucket order is key order."""
    top = np.fromiter((int(k[:8], 16) for k in keys), dtype=np.uint64, count=len(keys))
    return ((top * np.uint64(buckets)) >> np.uint64(32)).astype(np.int64)


def retry_group_of(shard: str, groups: int) -> int:
    return zlib.crc32(shard.encode("utf-8")) % groups


def bucket_dir(work_uri: str, kind: str, bucket: int) -> str:
    return join(work_uri, kind, f"b{bucket:05d}")


def retry_dir(work_uri: str, group: int) -> str:
    return join(work_uri, "retry", f"g{group:05d}")


class _BucketFiles:
    """One Parquet file per bucket, ``<dir of the bucket>/<name>``, opened on the first rows it gets (a task writes
    at most ``buckets`` files). Work files need no atomic write: a retried task rewrites the same names, and the
    next pass starts only when every task of this one has returned."""

    def __init__(self, storage: Storage, dir_of, name: str, schema: pa.Schema):
        self.storage, self.dir_of, self.name, self.schema = storage, dir_of, name, schema
        self.open: dict[int, tuple] = {}

    def write(self, bucket: int, table: pa.Table) -> None:
        if bucket not in self.open:
            uri = join(self.dir_of(bucket), self.name)
            fs, path = self.storage.arrow_fs(uri)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            sink = fs.open_output_stream(path)
            self.open[bucket] = (sink, pq.ParquetWriter(sink, self.schema))
        self.open[bucket][1].write_table(table.cast(self.schema))

    def close(self) -> None:
        for sink, writer in self.open.values():
            writer.close()
            sink.close()
        self.open.clear()


def _split_by_bucket(table: pa.Table, buckets_of_rows: np.ndarray, out: _BucketFiles) -> None:
    order = np.argsort(buckets_of_rows, kind="stable")
    sorted_buckets = buckets_of_rows[order]
    table = table.take(pa.array(order))
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]]) if len(order) else []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(order)
        out.write(int(sorted_buckets[start]), table.slice(int(start), int(end - start)))


def scatter_records(storage: Storage, file_uri: str, file_index: int, work_uri: str, buckets: int) -> dict:
    """records/ file -> its records in the buckets of their keys. Returns rows read and rows without object_id."""
    out = _BucketFiles(storage, lambda b: bucket_dir(work_uri, "rec", b), f"f{file_index:06d}.parquet",
                       RECORD_SCHEMA)
    rows = missing = 0
    try:
        for batch in storage.iter_batches(file_uri, list(TASK_FIELDS), SCATTER_BATCH_ROWS):
            n = batch.num_rows
            positions = np.arange(rows, rows + n, dtype=np.int64) + (np.int64(file_index) << np.int64(32))
            rows += n
            columns = {f: (batch.column(f) if f in batch.schema.names else pa.nulls(n, _STR)) for f in TASK_FIELDS}
            ids = columns["object_id"]
            has_id = pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False)
            missing += n - int(pc.sum(has_id).as_py() or 0)
            table = pa.table({"pos": positions, **columns}).filter(has_id)
            if not table.num_rows:
                continue
            keys = [shard_key(oid) for oid in table.column("object_id").to_pylist()]
            table = table.add_column(0, "key", pa.array(keys, _STR))
            _split_by_bucket(table, bucket_of_keys(keys, buckets), out)
    finally:
        out.close()
    return {"rows": rows, "missing_ids": missing}


def scatter_committed(storage: Storage, images_uri: str, names: list[str], group_index: int, work_uri: str,
                      buckets: int) -> int:
    """A group of committed shard files -> (object_id, status, shard) in the buckets of their keys."""
    out = _BucketFiles(storage, lambda b: bucket_dir(work_uri, "img", b), f"g{group_index:06d}.parquet",
                       COMMITTED_SCHEMA)
    rows = 0
    try:
        for name in names:
            table = storage.read_table(join(images_uri, name), columns=["object_id", "status"])
            table = table.filter(pc.fill_null(pc.greater(pc.utf8_length(table.column("object_id")), 0), False))
            if not table.num_rows:
                continue
            rows += table.num_rows
            table = table.append_column("shard", pa.array([name] * table.num_rows, _STR))
            keys = [shard_key(oid) for oid in table.column("object_id").to_pylist()]
            _split_by_bucket(table, bucket_of_keys(keys, buckets), out)
    finally:
        out.close()
    return rows


def _read_dir(storage: Storage, uri: str, schema: pa.Schema) -> pa.Table:
    names = sorted(n for n in storage.list(uri) if n.endswith(".parquet"))
    if not names:
        return schema.empty_table()
    return pa.concat_tables([storage.read_table(join(uri, n)).cast(schema) for n in names])


def plan_bucket(storage: Storage, work_uri: str, bucket: int, refetch: Iterable[str], retry_groups: int) -> dict:
    """One bucket: first occurrences, minus committed ids, sorted by key -> pending/bNNNNN.parquet; committed
    rows to refetch -> retry/gNNNNN/bNNNNN.parquet. Returns the bucket's counts."""
    records = _read_dir(storage, bucket_dir(work_uri, "rec", bucket), RECORD_SCHEMA)
    committed = _read_dir(storage, bucket_dir(work_uri, "img", bucket), COMMITTED_SCHEMA)
    firsts = records.group_by("object_id", use_threads=False).aggregate([("pos", "min")]).column("pos_min")
    unique = records.filter(pc.is_in(records.column("pos"), value_set=firsts.combine_chunks()))
    duplicates = records.num_rows - unique.num_rows
    done = pc.is_in(unique.column("object_id"), value_set=committed.column("object_id").combine_chunks())
    pending = unique.filter(pc.invert(done)).sort_by("key").select(PENDING_SCHEMA.names)
    storage.write_parquet_file(pending, join(work_uri, "pending", f"b{bucket:05d}.parquet"))
    refetch = pa.array(sorted(set(refetch)), _STR)
    retry_rows = 0
    if len(refetch) and committed.num_rows:
        again = committed.filter(pc.is_in(committed.column("status"), value_set=refetch))
        again = again.select(["object_id", "shard"]).join(unique.select(PENDING_SCHEMA.names), "object_id",
                                                           join_type="inner", use_threads=False)
        retry_rows = again.num_rows
        if retry_rows:
            again = again.select(RETRY_SCHEMA.names)
            groups = np.fromiter((retry_group_of(s, retry_groups) for s in again.column("shard").to_pylist()),
                                 dtype=np.int64, count=retry_rows)
            out = _BucketFiles(storage, lambda g: retry_dir(work_uri, g), f"b{bucket:05d}.parquet", RETRY_SCHEMA)
            try:
                _split_by_bucket(again, groups, out)
            finally:
                out.close()
    return {"bucket": bucket, "unique": unique.num_rows, "duplicates": duplicates,
            "committed": int(pc.sum(done).as_py() or 0), "pending": pending.num_rows, "retry": retry_rows}


def _task_row(shard_id: str, table: pa.Table, replace: bool) -> dict:
    records = table.select(list(TASK_FIELDS)).to_pylist()
    return {"shard_id": shard_id, "records": len(records), "replace": replace,
            "task": json.dumps({"shard_id": shard_id, "records": records, "replace": replace})}


def new_shard_id(keys: list[str], object_ids: list[str]) -> str:
    """The name ``plan_shards`` gives a shard of these (key-sorted) records."""
    digest = hashlib.sha256("\n".join(object_ids).encode("utf-8")).hexdigest()[:16]
    return f"{SHARD_PREFIX}{keys[0][:8]}-{digest}"


def cut_shards(storage: Storage, work_uri: str, slices: list[tuple[int, int, int]], shard_size: int,
               index: int) -> tuple[int, Optional[str]]:
    """Pending rows ``slices`` [(bucket, start, stop)], one after the other, cut into shards of ``shard_size`` (the
    last may be shorter: the end of all pending rows) -> tasks/new-NNNNN.parquet. Returns (#shards, that file)."""
    parts = []
    for bucket, start, stop in slices:
        table = storage.read_table(join(work_uri, "pending", f"b{bucket:05d}.parquet"))
        parts.append(table.slice(start, stop - start))
    rows = pa.concat_tables(parts) if parts else PENDING_SCHEMA.empty_table()
    out = []
    for start in range(0, rows.num_rows, shard_size):
        chunk = rows.slice(start, shard_size)
        shard_id = new_shard_id(chunk.column("key").to_pylist(), chunk.column("object_id").to_pylist())
        out.append(_task_row(shard_id, chunk, False))
    return len(out), _write_tasks(storage, join(work_uri, "tasks", f"new-{index:05d}.parquet"), out)


def group_retries(storage: Storage, work_uri: str, group: int) -> tuple[int, Optional[str]]:
    """A retry group's rows -> one replace task per shard file, tasks/retry-NNNNN.parquet. Returns (#shards,
    that file)."""
    rows = _read_dir(storage, retry_dir(work_uri, group), RETRY_SCHEMA)
    if not rows.num_rows:
        return 0, None
    rows = rows.sort_by([("shard", "ascending"), ("key", "ascending")])
    shards = rows.column("shard").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(shards)
        name = str(shards[start])
        out.append(_task_row(name[: -len(".parquet")], rows.slice(int(start), int(end - start)), True))
    return len(out), _write_tasks(storage, join(work_uri, "tasks", f"retry-{group:05d}.parquet"), out)


def _write_tasks(storage: Storage, uri: str, rows: list[dict]) -> Optional[str]:
    """One row group per shard task, so that a worker reads just its own (``read_task``)."""
    if not rows:
        return None
    import io

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=TASKS_SCHEMA), buf, row_group_size=1, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())
    return uri


def read_task(storage: Storage, task_file: str, row_group: int) -> str:
    """The ShardTask JSON at ``row_group`` of a task file."""
    fs, path = storage.arrow_fs(task_file)
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).read_row_group(row_group, columns=["task"]).column("task")[0].as_py()


def slices_for_cuts(pending: list[int], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """Per bucket in which shards start: the pending-file slices [(bucket, start, stop)] those shards cover.

    Shards are cut at global positions k * shard_size of the buckets' pending rows laid end to end."""
    offsets = np.concatenate([[0], np.cumsum(pending, dtype=np.int64)])
    total = int(offsets[-1])
    jobs = []
    for b, count in enumerate(pending):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        first = -(-lo // shard_size) * shard_size  # the first shard start at or after lo
        if first >= hi:
            continue
        stop = min(total, -(-hi // shard_size) * shard_size)  # the end of the last shard starting before hi
        slices, pos, bb = [], first, b
        while pos < stop:
            while offsets[bb + 1] <= pos:
                bb += 1
            end = min(stop, int(offsets[bb + 1]))
            slices.append((bb, pos - int(offsets[bb]), end - int(offsets[bb])))
            pos = end
        jobs.append(slices)
    return jobs


@dataclass
class DistributedPlan:
    """What the driver keeps of a plan: counts and the task files (one row group per shard task) with their
    number of shards."""
    task_files: list[tuple[str, int]]
    shards: int
    total_records: int  # rows in records/
    unique_records: int  # distinct object_ids in records/
    committed: int
    pending_new: int
    pending_retry: int
    new_shards: int = 0
    duplicate_ids: int = 0
    missing_ids: int = 0
    retry_statuses: tuple[str, ...] = field(default_factory=tuple)


def plan_download(storage: Storage, records_uri: str, images_uri: str, work: str, shard_size: int,
                  refetch: Iterable[str], remote=None, bucket_rows: int = BUCKET_ROWS,
                  committed_group_rows: int = COMMITTED_GROUP_ROWS) -> DistributedPlan:
    """Run the passes (module doc). ``remote(fn, *args)``: how a pass's function runs — a Ray task in the stage
    (``ray_plan_runner``), a plain call in tests — returning a list of results for a list of calls."""
    refetch = tuple(sorted(set(refetch)))
    run = remote or _run_here
    storage.delete(work)  # a killed run's passes
    record_files = storage.dataset_files(records_uri)
    total_rows = sum(_num_rows(storage, uri) for uri in record_files)
    buckets = max(1, -(-total_rows // bucket_rows))
    committed_names = shard_files(storage, images_uri)
    per_group = max(1, committed_group_rows // max(1, shard_size))
    groups = [committed_names[i:i + per_group] for i in range(0, len(committed_names), per_group)]
    scattered = run([(scatter_records, (storage, uri, i, work, buckets)) for i, uri in enumerate(record_files)]
                    + [(scatter_committed, (storage, images_uri, names, g, work, buckets))
                       for g, names in enumerate(groups)])
    read = scattered[:len(record_files)]
    counts = run([(plan_bucket, (storage, work, b, refetch, buckets)) for b in range(buckets)])
    pending = [c["pending"] for c in counts]
    cuts = slices_for_cuts(pending, shard_size)
    made = run([(cut_shards, (storage, work, slices, shard_size, i)) for i, slices in enumerate(cuts)]
               + [(group_retries, (storage, work, g)) for g in range(buckets)])
    return DistributedPlan(
        task_files=[(uri, n) for n, uri in made if uri], shards=sum(n for n, _ in made), total_records=sum(r["rows"] for r in read),
        unique_records=sum(c["unique"] for c in counts), committed=sum(c["committed"] for c in counts),
        pending_new=sum(pending), pending_retry=sum(c["retry"] for c in counts), new_shards=sum(n for n, _ in made[:len(cuts)]),
        duplicate_ids=sum(c["duplicates"] for c in counts), missing_ids=sum(r["missing_ids"] for r in read),
        retry_statuses=refetch)


def _num_rows(storage: Storage, uri: str) -> int:
    fs, path = storage.arrow_fs(uri)
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _run_here(calls: list) -> list:
    return [fn(*args) for fn, args in calls]


def ray_plan_runner(calls: list) -> list:
    """Each call a Ray task (1 CPU); results in call order; the first failure cancels the rest and is raised."""
    import ray

    @ray.remote(num_cpus=1, max_retries=2)
    def call(fn, args):
        return fn(*args)

    refs = [call.remote(fn, args) for fn, args in calls]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError:
        for ref in refs:
            ray.cancel(ref)
        raise


# ---------------------------------------------------------------------------------------------------------- report

@dataclass
class CommittedCounts:
    """images/ counted one shard file at a time: rows, statuses, (host, status) pairs."""
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_host: dict = field(default_factory=lambda: defaultdict(Counter))


def count_committed(storage: Storage, images_uri: str) -> CommittedCounts:
    counts = CommittedCounts()
    for name in shard_files(storage, images_uri):
        table = storage.read_table(join(images_uri, name), columns=["status", "host"])
        counts.rows += table.num_rows
        grouped = table.group_by(["host", "status"], use_threads=False).aggregate([([], "count_all")])
        for host, status, n in zip(grouped.column("host").to_pylist(), grouped.column("status").to_pylist(),
                                   grouped.column("count_all").to_pylist()):
            counts.by_status[status] += n
            counts.by_host[host or "(local)"][status] += n
    return counts


__all__ = ["plan_download", "DistributedPlan", "count_committed", "CommittedCounts", "ray_plan_runner",
           "slices_for_cuts", "bucket_of_keys", "new_shard_id"]
