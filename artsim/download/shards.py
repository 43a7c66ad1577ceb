"""Deterministic shards, atomic commits, resume and incremental runs.

The unit of work and of commit is a *shard*: up to ``download.shard_size`` records, written as one Parquet file
``images/shard-<first key>-<digest>.parquet`` in a single atomic write (temporary name + rename locally, one PUT on
S3). A shard file either exists completely or not at all, so:

* **resume** — a re-run reads the ``object_id`` column of the committed shard files and plans work only for the
  records that are in none of them; a killed job loses at most its in-flight shards;
* **incremental** — records added to the sources later are, by the same rule, the only ones fetched; they form new
  shards; committed shards are never rewritten and their records never refetched;
* **retry-failed** — records whose committed status is retryable are refetched and *their own* shard file is
  rewritten in place (one atomic replace) with the new rows, so a record never appears twice. Records committed
  as ``internal_error`` (a bug in artsim, not an answer from a server) are refetched this way by *every* run, with
  or without ``--retry-failed``: a re-run after the fix picks them up.

Records are ordered by sha256(object_id) before chunking: shard contents and names depend only on which records are
pending, never on source order, so a re-run after a crash plans the same shards as the run it replaces, and hosts
are spread evenly over shards.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import pyarrow as pa

from artsim.download.fetch import FetchResult, Fetcher, host_of
from artsim.rundir.schema import IMAGES_SCHEMA, REFETCH_STATUSES
from artsim.rundir.images import SHARD_PREFIX, shard_files
from artsim.storage import Storage, join

TASK_FIELDS = ("object_id", "image_url", "iiif_service", "license", "sha256")

# images/ rows: the docs/DESIGN.md columns first, then provenance columns the report and later runs use.
OUTPUT_SCHEMA = pa.schema(list(IMAGES_SCHEMA) + [
    pa.field("host", pa.string()),
    pa.field("bytes_downloaded", pa.int64()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("attempts", pa.int32()),
])


def shard_key(object_id: str) -> str:
    return hashlib.sha256(object_id.encode("utf-8")).hexdigest()


@dataclass
class ShardTask:
    shard_id: str  # file name without .parquet
    records: list[dict]  # TASK_FIELDS of each record to fetch
    replace: bool = False  # retry-failed: merge into the existing file of this name

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "ShardTask":
        return ShardTask(**json.loads(text))


@dataclass
class Plan:
    tasks: list[ShardTask]
    total_records: int  # in records/
    committed: int  # records already in committed shards
    pending_new: int
    pending_retry: int
    duplicate_ids: int = 0  # duplicate object_ids in records/ (first kept)
    missing_ids: int = 0  # records without object_id (cannot be tracked; skipped)
    retry_statuses: tuple[str, ...] = field(default_factory=tuple)


def read_committed(storage: Storage, images_uri: str, columns: Iterable[str] = ("object_id", "status")) -> pa.Table:
    """The given columns of every committed shard, plus ``shard`` (file name). Empty table when none."""
    import pyarrow.dataset as ds

    names = shard_files(storage, images_uri)
    columns = list(columns)
    if not names:
        return pa.table({**{c: pa.array([], OUTPUT_SCHEMA.field(c).type) for c in columns},
                         "shard": pa.array([], pa.string())})
    fs, base = storage.arrow_fs(images_uri)
    paths = [f"{base.rstrip('/')}/{n}" for n in names]
    table = ds.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns + ["__filename"])
    shard = pa.array([p.rsplit("/", 1)[-1] for p in table.column("__filename").to_pylist()], pa.string())
    return table.drop_columns(["__filename"]).append_column("shard", shard)


def plan_shards(records: pa.Table, committed: pa.Table, shard_size: int, retry_failed: bool,
                retry_statuses: Iterable[str]) -> Plan:
    """Which records to fetch, grouped into shards. Pure function of (records, committed) — see module doc."""
    retry_statuses = tuple(retry_statuses)
    rows = records.select([f for f in TASK_FIELDS if f in records.column_names]).to_pylist()
    seen: set[str] = set()
    unique: list[dict] = []
    duplicates = missing = 0
    for row in rows:
        oid = row["object_id"]
        if not oid:
            missing += 1
        elif oid in seen:
            duplicates += 1
        else:
            seen.add(oid)
            unique.append(row)
    done_ids = committed.column("object_id").to_pylist()
    done = set(done_ids)
    new = sorted((r for r in unique if r["object_id"] not in done), key=lambda r: shard_key(r["object_id"]))
    tasks = []
    for start in range(0, len(new), shard_size):
        chunk = new[start:start + shard_size]
        digest = hashlib.sha256("\n".join(r["object_id"] for r in chunk).encode("utf-8")).hexdigest()[:16]
        first = shard_key(chunk[0]["object_id"])[:8]
        tasks.append(ShardTask(f"{SHARD_PREFIX}{first}-{digest}", chunk))
    retry_count = 0
    refetch = set(REFETCH_STATUSES) | (set(retry_statuses) if retry_failed else set())
    if refetch and committed.num_rows:
        by_id = {r["object_id"]: r for r in unique}
        per_shard: dict[str, list[dict]] = defaultdict(list)
        for oid, status, shard in zip(done_ids, committed.column("status").to_pylist(),
                                      committed.column("shard").to_pylist()):
            if status in refetch and oid in by_id:
                per_shard[shard].append(by_id[oid])
        for shard in sorted(per_shard):
            tasks.append(ShardTask(shard[: -len(".parquet")], per_shard[shard], replace=True))
            retry_count += len(per_shard[shard])
    return Plan(tasks, len(rows), len(done & seen), len(new), retry_count, duplicates, missing, retry_statuses)


def interleave_by_host(records: list[dict]) -> list[dict]:
    """Round-robin over hosts, so that a thread pool works on many hosts at once instead of queueing on one."""
    queues: dict[Optional[str], list[dict]] = defaultdict(list)
    for r in records:
        queues[host_of(r.get("image_url") or r.get("iiif_service"))].append(r)
    out: list[dict] = []
    lists = list(queues.values())
    for i in range(max((len(q) for q in lists), default=0)):
        out.extend(q[i] for q in lists if i < len(q))
    return out


def result_row(r: FetchResult) -> dict:
    return {
        "object_id": r.object_id, "status": r.status, "http_status": r.http_status,
        "error": (r.error or None) and r.error[:500], "url_final": r.url_final, "width": r.width,
        "height": r.height, "sha256": r.sha256, "image": r.image if r.status == "ok" else None,
        "host": r.host, "bytes_downloaded": r.bytes_downloaded, "original_width": r.original_width,
        "original_height": r.original_height, "attempts": r.attempts,
    }


def process_shard(task: ShardTask, fetcher: Fetcher, storage: Storage, images_uri: str, threads: int) -> dict:
    """Fetch a shard's records with a thread pool, then commit the shard file atomically. Returns its summary."""
    start = time.perf_counter()
    uri = join(images_uri, task.shard_id + ".parquet")
    if not task.replace and storage.exists(uri):
        # Ray ran this task again after its first attempt had committed (the worker's node went away between the
        # commit and the task's result reaching the driver). The name is a digest of the shard's object ids, so
        # the file holds exactly these records: fetching them again would only hit the servers twice.
        return committed_summary(storage, uri, task, time.perf_counter() - start)
    records = interleave_by_host(task.records)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(records)))) as pool:
        results = list(pool.map(fetcher.fetch_record, records))
    table = pa.Table.from_pylist([result_row(r) for r in results], schema=OUTPUT_SCHEMA)
    if task.replace and storage.exists(uri):
        old = storage.read_table(uri)
        refetched = pa.array([r["object_id"] for r in records], pa.string())
        import pyarrow.compute as pc

        keep = old.filter(pc.invert(pc.is_in(old.column("object_id"), value_set=refetched)))
        table = pa.concat_tables([keep.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA), table])
    storage.write_parquet_file(table, uri)  # the commit: one atomic write
    return summarize(results, task.shard_id, time.perf_counter() - start, fetcher.internal_errors)


def committed_summary(storage: Storage, uri: str, task: ShardTask, elapsed_s: float) -> dict:
    """The summary of a shard that an earlier attempt of the same task committed (nothing fetched now)."""
    statuses = storage.read_table(uri, columns=["status"]).column("status").to_pylist()
    return {"shard_id": task.shard_id, "records": len(statuses), "status": dict(Counter(statuses)), "hosts": {},
            "bytes_downloaded": 0, "bytes_written": 0, "requests": 0, "elapsed_s": elapsed_s,
            "already_committed": True}


def summarize(results: list[FetchResult], shard_id: str, elapsed_s: float,
              tracebacks: Optional[dict[str, str]] = None) -> dict:
    """``tracebacks``: the Fetcher's first traceback per internal-error signature (sent with each signature seen)."""
    by_host: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_host[r.host or "(local)"][r.status] += 1
    internal = Counter(r.internal_error for r in results if r.status == "internal_error")
    return {
        "internal_errors": {sig: {"count": n, "traceback": (tracebacks or {}).get(sig, "")}
                            for sig, n in internal.items()},
        "shard_id": shard_id, "records": len(results),
        "status": dict(Counter(r.status for r in results)),
        "hosts": {h: dict(c) for h, c in by_host.items()},
        "bytes_downloaded": sum(r.bytes_downloaded for r in results),
        "bytes_written": sum(len(r.image) for r in results if r.image),
        "requests": sum(r.attempts for r in results),
        "elapsed_s": elapsed_s,
    }
