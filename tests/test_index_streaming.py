"""The index stage at scale: the driver plans from file metadata and object ids, tasks stream their own vectors.

- plan functions (pieces, shards, sampling) tested directly on file metadata;
- the streaming readers give exactly what the whole-table path gives (same skipped rows, same vectors), with
  batches that cut through files and row groups;
- an exact index built from several Parquet files (float16, small row groups, bad rows in several files) in several
  shards returns what brute force over the good vectors returns;
- the driver's memory stays far below the vectors' size (measured in a child process: tracemalloc for numpy and
  Python, a proxy Arrow memory pool for Arrow), while loading the table the old way goes over the same cap.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artsim.config import config_from_dict
from artsim.errors import ArtsimError
from artsim.index.plan import sample_rows
from artsim.index.stage import run_index
from artsim.index.build import (EmbeddingFile, Piece, ShardPlan, assign_ids, build_shard, embedding_files,
                                embeddings_from_table, first_good_rows, pieces_between, plan_shards,
                                read_object_ids, read_shard_vectors, scan_piece, scan_pieces, vector_batch)
from artsim.testing.index_data import clustered_vectors, object_ids_for
from artsim.runtime import RunContext
from artsim.serving import ShardedIndex
from artsim.storage import Storage, join

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- plans from metadata ------------------------------------------------------------------------------------------

FILES = [EmbeddingFile("a.parquet", 5), EmbeddingFile("b.parquet", 0), EmbeddingFile("c.parquet", 7),
         EmbeddingFile("d.parquet", 3)]  # global rows: a 0-4, c 5-11, d 12-14


def _covered(pieces):
    return [p.first_row + i for p in pieces for i in range(p.num_rows)]


def test_scan_pieces_cover_every_row_once_in_order():
    pieces = scan_pieces(FILES, max_rows=3)
    assert _covered(pieces) == list(range(15))
    assert all(0 < p.num_rows <= 3 for p in pieces)
    assert [(p.uri, p.start, p.stop) for p in pieces[:4]] == [("a.parquet", 0, 3), ("a.parquet", 3, 5),
                                                               ("c.parquet", 0, 3), ("c.parquet", 3, 6)]


def test_plan_build_without_ray_keeps_ids_skips_bad_rows_and_holds_out_queries():
    """plan_sampling + plan_build are plain functions: from the scan's good-row mask, the previous id map and the
    records they decide rows, stable ids, index type, shards and tuning queries."""
    from artsim.index.plan import plan_build, plan_sampling

    cfg = config_from_dict({"run": {"root": "unused"}, "index": {"num_shards": 2, "tuning_queries": 10}}).index
    object_ids = pa.array(["m:0", "m:1", "m:2", "m:1", "", "s:5", "s:6", "s:7", "s:8", "s:9", "m:10", "m:11", "m:12",
                           "m:13", "m:14"])
    good = np.ones(15, bool)
    good[2] = False  # a bad vector
    sampling = plan_sampling(cfg, 15, 4)
    assert sampling.provisional.kind == "flat" and len(sampling.train_candidates) == 0
    queries = np.eye(4, dtype=np.float32)[np.arange(len(sampling.query_candidates)) % 4]
    previous = pa.table({"id": pa.array([7, 3], pa.int64()), "object_id": ["s:6", "m:0"]})
    plan = plan_build(cfg, name="x", index_uri="mem://x", emb_uri="mem://e", dim=4, files=FILES,
                      pieces=scan_pieces(FILES), object_ids=object_ids, good=good, sampling=sampling,
                      query_vectors=queries, previous_ids=previous, previous_next_id=8, build_id="b")
    assert plan.rows.tolist() == [0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert plan.skipped == {"bad_vector_or_id": 2, "duplicate_object_id": 1}
    ids = dict(zip(plan.ids_table.column("object_id").to_pylist(), plan.ids_table.column("id").to_pylist()))
    assert ids["m:0"] == 3 and ids["s:6"] == 7 and min(v for k, v in ids.items() if k not in ("m:0", "s:6")) == 8
    assert plan.next_id == 8 + 10 and plan.reused_ids == 2 and plan.index.factory == "IDMap2,Flat"
    assert sum(len(s.rows) for s in plan.shards) == 12 and len(plan.shards) == 2
    assert set(plan.ids_table.column("collection").to_pylist()) == {"m", "s"}
    assert len(plan.queries) == 1 and plan.queries.dtype == np.float32  # min(10, 12 // 10)
    # What the driver keeps (the plan task returns it): counts and samples, nothing per row.
    light = plan.without_rows()
    assert light.n == 12 and light.shard_sizes == [6, 6] and light.next_id == plan.next_id
    assert len(light.rows) == 0 and len(light.ids) == 0 and light.shards == [] and light.ids_table is None
    assert light.skipped == plan.skipped and np.array_equal(light.queries, plan.queries)


def test_plan_shards_contiguous_balanced_deterministic():
    rows = np.array([0, 2, 3, 4, 6, 7, 9, 10, 11, 13, 14])  # 1, 5, 8, 12 skipped
    ids = np.arange(100, 100 + len(rows))[::-1].copy()  # ids need not follow row order
    plans = plan_shards(FILES, rows, ids, 3)
    assert [len(p.rows) for p in plans] == [3, 4, 4]
    assert np.array_equal(np.concatenate([p.rows for p in plans]), rows)
    assert np.array_equal(np.concatenate([p.ids for p in plans]), ids)
    for p in plans:  # each shard reads exactly the run of rows from its first to its last row
        assert _covered(p.pieces) == list(range(p.rows[0], p.rows[-1] + 1))
    assert [(q.uri, q.start, q.stop) for q in plans[1].pieces] == [("a.parquet", 4, 5), ("c.parquet", 0, 5)]
    again = plan_shards(FILES, rows, ids, 3)
    assert [(p.pieces, p.rows.tolist(), p.ids.tolist()) for p in plans] == \
           [(p.pieces, p.rows.tolist(), p.ids.tolist()) for p in again]
    assert len(plan_shards(FILES, rows[:2], ids[:2], 5)) == 2  # never an empty shard
    with pytest.raises(ValueError):
        plan_shards(FILES, rows[::-1], ids, 2)
    assert pieces_between(FILES, 4, 6) == [Piece("a.parquet", 4, 5, 4), Piece("c.parquet", 0, 1, 5)]


def test_sample_rows_excludes_and_is_distinct():
    rng = np.random.default_rng(0)
    exclude = np.array([0, 3, 4, 9, 99])
    picked = sample_rows(rng, 100, 95, exclude)
    assert len(picked) == 95 and sorted(set(picked.tolist())) == picked.tolist()
    assert not set(picked.tolist()) & set(exclude.tolist())
    assert len(sample_rows(np.random.default_rng(0), 100, 500, exclude)) == 95  # capped at what is available


def test_assign_ids_vectorised_keeps_old_and_numbers_new_in_order():
    prev = pa.table({"id": pa.array([0, 5, 7], pa.int64()), "object_id": ["x", "y", "z"]})
    ids, next_id, reused = assign_ids(pa.array(["q", "z", "r", "x"]), prev, previous_next_id=10)
    assert ids.tolist() == [10, 7, 11, 0] and next_id == 12 and reused == 2
    ids, next_id, reused = assign_ids(np.array(["a", "b"], dtype=object), None)
    assert ids.tolist() == [0, 1] and next_id == 2 and reused == 0


# -- streaming reads equal the whole-table path -------------------------------------------------------------------

DIM = 24


def _bad_rows_table(n: int, seed: int, start: int = 0, dtype=np.float16):
    """n rows; some with a NaN, a zero, a null vector, an empty id, a repeated id, an off-norm vector."""
    vectors = clustered_vectors(n, DIM, n_clusters=12, seed=seed)
    object_ids = object_ids_for(n, start=start)
    values = [v.astype(dtype).astype(np.float32).tolist() for v in vectors]
    values[3][0] = float("nan")
    values[7] = [0.0] * DIM
    values[11] = None
    object_ids[13] = ""
    object_ids[17] = object_ids[2]  # repeated: the first good one (row 2) wins
    object_ids[19] = object_ids[3]  # row 3 is bad, so this row holds the object's only good vector
    values[23] = [2 * x for x in values[23]]
    emb = pa.array(values, pa.list_(pa.float32(), DIM))
    return pa.table({"object_id": pa.array(object_ids, pa.string()), "embedding": emb})


def _write_embeddings(storage, uri, tables, row_group_size):
    with storage.atomic_dir(uri) as staging:
        for i, table in enumerate(tables):
            pq.write_table(table, join(staging, f"part-{i:05d}.parquet"), row_group_size=row_group_size)
        storage.write_json(join(staging, "_model.json"), {"model_key": "test-model", "output_dim": DIM})


@pytest.fixture()
def three_files(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "embeddings" / "test-model")
    tables = [_bad_rows_table(130, 1, 0), _bad_rows_table(45, 2, 1000), _bad_rows_table(210, 3, 2000)]
    _write_embeddings(storage, uri, tables, row_group_size=16)
    return storage, uri, pa.concat_tables(tables)


def test_streamed_rows_equal_the_whole_table_path(three_files):
    storage, uri, whole = three_files
    files, emb_type = embedding_files(storage, uri)
    assert [f.num_rows for f in files] == [130, 45, 210] and emb_type.list_size == DIM
    expected = embeddings_from_table(whole)
    assert expected.skipped == {"bad_vector_or_id": 3 * 4, "duplicate_object_id": 3}

    # scan in pieces that cut files and row groups, with batches that do not divide them either
    object_ids = read_object_ids(storage, files)
    pieces = scan_pieces(files, max_rows=50)
    picks = np.array([0, 7, 100, 131, 384])
    good, picked = [], []
    for piece in pieces:
        lo, hi = np.searchsorted(picks, [piece.first_row, piece.first_row + piece.num_rows])
        result = scan_piece(storage, piece, DIM, [picks[lo:hi]], batch_rows=7)
        good.append(result.good)
        picked.append(result.picked[0])
    rows, skipped = first_good_rows(object_ids, np.concatenate(good))
    assert skipped == expected.skipped
    assert object_ids.take(pa.array(rows)).to_pylist() == expected.object_ids.tolist()
    all_vectors, _, _ = vector_batch(whole.column("embedding"), DIM)
    np.testing.assert_array_equal(np.concatenate(picked)[[0, 2, 3, 4]], all_vectors[picks[[0, 2, 3, 4]]])

    ids = np.arange(len(rows), dtype=np.int64) + 1000
    plans = plan_shards(files, rows, ids, 3)
    streamed_v, streamed_i = [], []
    for plan in plans:
        for vectors, batch_ids in read_shard_vectors(storage, plan, DIM, batch_rows=11):
            assert len(vectors) <= 11
            streamed_v.append(vectors)
            streamed_i.append(batch_ids)
    np.testing.assert_array_equal(np.concatenate(streamed_v), expected.vectors)  # normalised the same way
    assert np.concatenate(streamed_i).tolist() == ids.tolist()


def test_shard_task_notices_a_row_that_went_bad(three_files, tmp_path):
    storage, uri, whole = three_files
    files, _ = embedding_files(storage, uri)
    plan = ShardPlan(pieces_between(files, 0, 6), np.array([0, 1, 2, 3, 4, 5]), np.arange(6))  # row 3 is NaN
    with pytest.raises(ArtsimError, match="changed while the index was built"):
        list(read_shard_vectors(storage, plan, DIM, batch_rows=4))


def test_build_shard_in_batches_equals_one_add(tmp_path):
    import faiss

    from artsim.index.build import train_index

    vectors = clustered_vectors(500, DIM, seed=4)
    ids = np.arange(500, dtype=np.int64) * 3
    trained = train_index("IDMap2,Flat", DIM, vectors[:0])
    batches = [(vectors[i:i + 64], ids[i:i + 64]) for i in range(0, 500, 64)]
    result = build_shard(trained, iter(batches), str(tmp_path), queries=vectors[:20], k_truth=10)
    index = faiss.read_index(result.local_path)
    assert result.ntotal == 500 and index.ntotal == 500
    np.testing.assert_array_equal(index.reconstruct_batch(ids), vectors)
    order = np.argsort(-(vectors[:20] @ vectors.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(result.truth_ids, ids[order])


# -- the whole stage: several files, several shards, exact == brute force -----------------------------------------


def test_multi_file_multi_shard_exact_index_equals_brute_force(three_files, tmp_path, ray_session):
    storage, uri, whole = three_files
    ctx = RunContext(config_from_dict({"run": {"root": str(tmp_path)}, "index": {
        "embeddings": "test-model", "num_shards": 3, "tuning_queries": 20}}))
    assert ctx.paths.embeddings("test-model") == uri
    summary = run_index(ctx)
    expected = embeddings_from_table(whole)
    n = len(expected.object_ids)
    assert summary["vectors"] == n and summary["shards"] == 3
    assert summary["skipped"] == {"bad_vector_or_id": 12, "duplicate_object_id": 3}
    index = ShardedIndex.open(summary["index_uri"])
    try:
        manifest = index.manifest
        assert manifest["build"]["skipped"] == summary["skipped"] and manifest["build"]["files"] == 3
        sizes = [s["ntotal"] for s in manifest["shards"]]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # balanced by indexed rows
        ids = pq.read_table(os.path.join(summary["index_uri"], "ids.parquet"))
        assert sorted(ids.column("object_id").to_pylist()) == sorted(expected.object_ids.tolist())
        assert "" not in ids.column("object_id").to_pylist()
        queries = expected.vectors[[0, 50, 200, n - 1]]
        hits = index.search(queries, 10)
        # serving normalises queries; the stored float16 vectors are unit length only to ~1e-3
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ expected.vectors.T
        for q, got in enumerate(hits):
            best = np.argsort(-scores[q], kind="stable")[:10]
            assert [h["object_id"] for h in got] == expected.object_ids[best].tolist()
            np.testing.assert_allclose([h["score"] for h in got], scores[q][best], atol=1e-5)
    finally:
        index.close()

    # a rebuild from the same input gives the same shards and the same ids
    first_ids = ids.select(["id", "object_id", "shard"]).to_pylist()
    again = run_index(ctx)
    ids2 = pq.read_table(os.path.join(again["index_uri"], "ids.parquet")).select(["id", "object_id", "shard"])
    assert ids2.to_pylist() == first_ids and again["reused_ids"] == n


# -- the driver's memory --------------------------------------------------------------------------------------------

CHILD = r"""
import json, os, sys, tracemalloc
import pyarrow as pa
from artsim.config import config_from_dict
from artsim.runtime import RunContext
root, address, mode = sys.argv[1:4]
ctx = RunContext(config_from_dict({"run": {"root": root}, "ray": {"address": address},
                                   "index": {"embeddings": "test-model", "num_shards": 2, "tuning_queries": 50}}))
if mode == "run_index":
    from artsim.index.stage import run_index
    run_index(ctx)  # warm-up: the modules Ray and the stage import lazily (tens of MB) are not what is measured
warm_pool = pa.default_memory_pool()
proxy = pa.proxy_memory_pool(warm_pool)
pa.set_memory_pool(proxy)  # counts what Arrow allocates from here on (Parquet reads included)
tracemalloc.start()  # numpy reports its buffers to tracemalloc, Python objects are traced anyway
if mode == "run_index":
    vectors = run_index(ctx)["vectors"]  # a second build: also reads the first one's ids (incremental ids)
else:  # the whole table in memory, as the index stage did before
    from artsim.index.build import embeddings_from_table
    table = ctx.storage.read_table(ctx.paths.embeddings("test-model"), columns=["object_id", "embedding"])
    vectors = len(embeddings_from_table(table).object_ids)
    del table
print("RESULT " + json.dumps({"vectors": vectors, "traced_peak": tracemalloc.get_traced_memory()[1],
                              "arrow_peak": proxy.max_memory()}), flush=True)
os._exit(0)  # skip interpreter teardown: Arrow buffers may outlive the proxy pool
"""


def _driver_peaks(root, mode, address):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), address, mode], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_driver_memory_stays_far_below_the_vectors(tmp_path, ray_session):
    n, dim, n_files = 16_000, 1024, 4
    storage = Storage()
    uri = join(str(tmp_path), "embeddings", "test-model")
    vectors = clustered_vectors(n, dim, n_clusters=20, seed=5)
    object_ids = object_ids_for(n)
    per = n // n_files
    with storage.atomic_dir(uri) as staging:
        for i in range(n_files):
            emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors[i * per:(i + 1) * per].reshape(-1)), dim)
            pq.write_table(pa.table({"object_id": object_ids[i * per:(i + 1) * per], "embedding": emb}),
                           join(staging, f"part-{i:05d}.parquet"), row_group_size=1000)
    vector_bytes = n * dim * 4  # 62.5 MiB of float32
    cap = vector_bytes // 4
    address = ray_session.get_runtime_context().gcs_address

    streamed = _driver_peaks(tmp_path, "run_index", address)
    assert streamed["vectors"] == n
    assert streamed["traced_peak"] < cap, streamed
    assert streamed["arrow_peak"] < cap, streamed
    # the same measure sees the vectors when the driver does load them: the check above can fail
    whole = _driver_peaks(tmp_path, "whole_table", address)
    assert whole["traced_peak"] > vector_bytes and whole["arrow_peak"] > vector_bytes, whole
    print(f"driver peaks, MiB: streamed numpy/Python {streamed['traced_peak'] / 2**20:.1f}, Arrow "
          f"{streamed['arrow_peak'] / 2**20:.1f}; whole table {whole['traced_peak'] / 2**20:.1f}, "
          f"{whole['arrow_peak'] / 2**20:.1f}; vectors {vector_bytes / 2**20:.1f}")
    shutil.rmtree(tmp_path / "index", ignore_errors=True)
