"""The download's distributed plan (artsim/download/planner.py) gives exactly the shard tasks of the in-memory
reference ``plan_shards``: same shard ids, same records in the same order, same counts — with duplicates across
records/ files, records without ids, committed shards, retries and many buckets. Plain functions, no Ray; the stage
runs the same functions as Ray tasks (tests/test_download_job.py)."""
from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from artsim.download.planner import count_committed, plan_download, read_task, slices_for_cuts  # noqa: E402
from artsim.download.shards import OUTPUT_SCHEMA, ShardTask, TASK_FIELDS, plan_shards, read_committed  # noqa: E402
from artsim.rundir.schema import RETRYABLE_STATUSES, REFETCH_STATUSES  # noqa: E402
from artsim.storage import Storage  # noqa: E402

REFETCH = tuple(sorted(set(REFETCH_STATUSES) | set(RETRYABLE_STATUSES)))


def write_records(root, files: list[list[dict]], with_sha: bool = True) -> str:
    uri = os.path.join(root, "records")
    os.makedirs(uri, exist_ok=True)
    fields = [f for f in TASK_FIELDS if with_sha or f != "sha256"]
    schema = pa.schema([(f, pa.string()) for f in fields] + [("title", pa.string())])
    for i, rows in enumerate(files):
        table = pa.Table.from_pylist([{**{f: r.get(f) for f in fields}, "title": "t"} for r in rows], schema=schema)
        pq.write_table(table, os.path.join(uri, f"part-{i:05d}.parquet"))
    open(os.path.join(uri, "_SUCCESS"), "w").close()
    return uri


def commit(images: str, task: ShardTask, statuses) -> None:
    """A committed shard file as process_shard would write it (status per record, no fetching)."""
    os.makedirs(images, exist_ok=True)
    rows = [{"object_id": r["object_id"], "status": s, "host": f"h{i % 3}.example"}
            for i, (r, s) in enumerate(zip(task.records, statuses))]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), os.path.join(images, task.shard_id + ".parquet"))


def tasks_of(plan) -> list[dict]:
    out = []
    for uri, n in plan.task_files:
        tasks = [json.loads(t) for t in pq.read_table(uri).column("task").to_pylist()]
        assert len(tasks) == n and [json.loads(read_task(Storage(), uri, i)) for i in range(n)] == tasks
        out.extend(tasks)
    return out


def normalised(tasks) -> list[tuple]:
    """(shard_id, replace, records) with every TASK_FIELD present (None when missing), sorted by shard."""
    return sorted((t["shard_id"], t["replace"], [tuple(r.get(f) for f in TASK_FIELDS) for r in t["records"]])
                  for t in tasks)


def make_records(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        oid = f"c:{rnd.randrange(int(n * 0.8))}" if i % 7 else f"c:{i}"  # many ids repeat, in other files too
        if i % 97 == 0:
            oid = "" if i % 2 else None  # no id: skipped, counted
        rows.append({"object_id": oid, "image_url": f"http://h{i % 5}.example/{i}.jpg",
                     "iiif_service": None if i % 3 else f"http://iiif.example/{i}", "license": "CC0",
                     "sha256": None if i % 4 else f"{i:064x}"})
    return rows


@pytest.mark.parametrize("bucket_rows", [50, 100_000])
def test_distributed_plan_equals_the_reference_plan(tmp_path, bucket_rows):
    storage = Storage()
    rows = make_records(1200, seed=1)
    records = write_records(str(tmp_path), [rows[:400], rows[400:401], rows[401:]])
    images, work = str(tmp_path / "images"), str(tmp_path / "_work" / "plan")
    reference_records = storage.read_table(records, columns=list(TASK_FIELDS))

    def both(retry_failed: bool):
        ref = plan_shards(reference_records, read_committed(storage, images), 37, retry_failed, RETRYABLE_STATUSES)
        refetch = set(REFETCH_STATUSES) | (set(RETRYABLE_STATUSES) if retry_failed else set())
        got = plan_download(storage, records, images, work, 37, refetch, bucket_rows=bucket_rows,
                            committed_group_rows=80)
        assert normalised(tasks_of(got)) == normalised(
            [{"shard_id": t.shard_id, "replace": t.replace, "records": t.records} for t in ref.tasks])
        assert (got.total_records, got.committed, got.pending_new, got.pending_retry, got.duplicate_ids,
                got.missing_ids) == (ref.total_records, ref.committed, ref.pending_new, ref.pending_retry,
                                     ref.duplicate_ids, ref.missing_ids)
        assert got.shards == len(ref.tasks) and got.unique_records == ref.total_records - ref.duplicate_ids - \
            ref.missing_ids
        return ref, got

    ref, got = both(False)
    assert got.pending_new > 500 and got.duplicate_ids > 100 and got.missing_ids > 0  # the test data bites
    # Commit some shards with a mix of statuses (every other shard): the next plans skip them and retry some.
    cycle = ["ok", "http_error", "ok", "internal_error", "not_found", "timeout"]
    for i, task in enumerate(ref.tasks):
        if i % 2 == 0:
            commit(images, task, [cycle[(i + j) % len(cycle)] for j in range(len(task.records))])
    ref, got = both(False)
    assert got.committed > 0 and got.pending_retry > 0  # internal_error is refetched by every run
    ref, got = both(True)
    assert got.pending_retry > ref.committed / 3


def test_record_files_without_sha256_and_an_empty_run(tmp_path):
    storage = Storage()
    records = write_records(str(tmp_path), [make_records(100, seed=2)], with_sha=False)
    plan = plan_download(storage, records, str(tmp_path / "images"), str(tmp_path / "w"), 10, REFETCH)
    assert all(r["sha256"] is None for t in tasks_of(plan) for r in t["records"])
    empty = write_records(str(tmp_path / "e"), [[]])
    plan = plan_download(storage, empty, str(tmp_path / "images"), str(tmp_path / "w"), 10, REFETCH)
    assert plan.task_files == [] and plan.shards == 0 and plan.total_records == 0


def test_slices_for_cuts_cover_every_pending_row_once():
    for pending, size in [([5, 0, 3, 12, 1], 4), ([0, 0], 3), ([7], 7), ([1, 1, 1, 1, 1], 2), ([10, 10], 25)]:
        covered = []
        for slices in slices_for_cuts(pending, size):
            start = len(covered)
            for bucket, lo, hi in slices:
                assert 0 <= lo < hi <= pending[bucket]
                covered.extend((bucket, r) for r in range(lo, hi))
            assert start % size == 0  # each task starts on a shard boundary
        assert covered == [(b, r) for b, n in enumerate(pending) for r in range(n)]


def test_count_committed_matches_a_whole_table_count(tmp_path):
    images = str(tmp_path / "images")
    os.makedirs(images)
    statuses = ["ok", "not_found", "http_error", "ok"]
    for s in range(5):
        rows = [{"object_id": f"x:{s}:{i}", "status": statuses[(s + i) % 4], "host": None if i % 5 == 0 else
                 f"h{i % 3}"} for i in range(30)]
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), os.path.join(images, f"shard-{s}.parquet"))
    counts = count_committed(Storage(), images)
    table = read_committed(Storage(), images, columns=("status", "host"))
    assert counts.rows == table.num_rows == 150
    assert counts.by_status == Counter(table.column("status").to_pylist())
    expected: dict = {}
    for h, s in zip(table.column("host").to_pylist(), table.column("status").to_pylist()):
        expected.setdefault(h or "(local)", Counter())[s] += 1
    assert dict(counts.by_host) == expected
