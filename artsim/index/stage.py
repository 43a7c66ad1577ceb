"""The index stage: embeddings/<model_key>/ -> index/<name>/ (manifest.json, ids.parquet, shards/).

`run_index(ctx)` is the thin Ray layer. The driver never holds the vectors: it reads the Parquet footers and the
object_id column, and everything that touches vectors runs in Ray tasks that read them from storage themselves,
a bounded batch at a time (plain functions in build.py):

1. scan: one task per piece (<= 1M rows of one file) marks which rows hold a good vector and returns the vectors of
   the sampled tuning-query and training rows (the training ones stay in the object store);
2. driver: skipped rows (bad vector or id, repeated object_id), stable ids (`assign_ids`), index type, and shards
   as contiguous, row-balanced runs of the directory (`plan_shards`);
3. train (k-means / quantizer training on the sample; on a GPU when the cluster has one);
4. one task per shard: read the shard's rows batch by batch, add them to a copy of the trained index, write the
   shard to storage, and compute the exact top-10 of the tuning queries over the shard (the merged ground truth);
5. tune: load the written shards, sweep nprobe / efSearch, keep the cheapest setting reaching target recall.

Then ids.parquet and, last, manifest.json are written. Shards live under shards/<build_id>/, so a reader holding
the previous manifest keeps reading the previous build's shards; builds older than the previous one are deleted.
"""
from __future__ import annotations

import io
import logging

# faiss announces at INFO which CPU build it loads (and that the AVX512 one is missing); `artsim query` users
# would see that on every call. Warnings and errors still come through.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import os
import tempfile
import time
import uuid
from typing import Optional

import numpy as np

from artsim.console import Progress, say, table
from artsim.errors import ArtsimError, ConfigError, IntegrityError
from artsim.index.build import (assign_ids, batch_rows_for, embedding_files, first_good_rows, fixed_dim, id_table,
                                plan_shards, read_object_ids, read_record_columns, scan_pieces)
from artsim.index.factory import IndexPlan, choose_factory, kind_of_factory, nlist_for
from artsim.rundir.embeddings import first_good_rows, fixed_dim
from artsim.rundir.index_manifest import FORMAT, IDS, MANIFEST, METRIC, validate_manifest
from artsim.rundir.names import embeddings_key, index_name
from artsim.storage import Storage, join

log = logging.getLogger("artsim.index")
TRUTH_K = 10  # recall@10 is what tuning measures
MIN_TRAIN_PER_LIST = 40

__all__ = ["run_index"]


def _load_previous(storage: Storage, index_uri: str):
    """The previous build's (manifest, ids table), verified, or (None, None) when there is none."""
    import pyarrow.parquet as pq

    from artsim.serving.shards import verify_file

    manifest_uri = join(index_uri, MANIFEST)
    if not storage.exists(manifest_uri):
        return None, None
    manifest = validate_manifest(storage.read_json(manifest_uri), manifest_uri)
    with tempfile.TemporaryDirectory(prefix="artsim-ids-") as tmp:
        path = os.path.join(tmp, IDS)
        storage.download_file(join(index_uri, manifest["ids"]), path)
        try:
            verify_file(path, manifest["ids_sha256"], manifest["ids_bytes"], join(index_uri, manifest["ids"]))
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}. The previous index's ids cannot be trusted, so ids could not be kept "
                                 f"stable; delete {index_uri} to rebuild with fresh ids") from None
        ids = pq.read_table(path, columns=["id", "object_id"])
    return manifest, ids


def _plan(cfg, n: int, dim: int) -> IndexPlan:
    if cfg.factory:
        kind = kind_of_factory(cfg.factory)
        nlist = 0
        if kind == "ivf":
            import re

            m = re.search(r"IVF(\d+)", cfg.factory)
            nlist = int(m.group(1)) if m else nlist_for(n)
            if n < nlist:
                raise ConfigError("index.factory", f"{cfg.factory!r} has {nlist} lists but only {n} vectors")
        return IndexPlan(cfg.factory, kind, nlist, 0, "index.factory")
    return choose_factory(n, dim, cfg.memory_budget_gb, cfg.exact_max_vectors)


def sample_rows(rng: np.random.Generator, total: int, size: int, exclude: np.ndarray) -> np.ndarray:
    """``size`` distinct rows of ``range(total)`` not in ``exclude`` (sorted), sorted; never builds ``arange(total)``
    (tens of millions of rows)."""
    exclude = np.asarray(exclude, dtype=np.int64)
    available = total - len(exclude)
    picks = np.sort(rng.choice(available, size=min(size, available), replace=False)).astype(np.int64)
    # the p-th available row is p plus the number of excluded rows at or before it
    return picks + np.searchsorted(exclude - np.arange(len(exclude)), picks, side="right")


def _rows_in(rows: np.ndarray, piece) -> np.ndarray:
    lo, hi = np.searchsorted(rows, [piece.first_row, piece.first_row + piece.num_rows])
    return rows[lo:hi]


def run_index(ctx, **options) -> dict:
    """Build the index; the driver holds object ids, row masks and ids, never the vectors (see docs/index.md)."""
    import pyarrow as pa
    import ray

    from artsim.index.ray_tasks import max_length_task, scan_task, shard_task, train_task, tune_task
    from artsim.runtime import ensure_ray

    ensure_ray(ctx.config)
    cfg = ctx.config.index
    storage, paths = ctx.storage, ctx.paths
    started = time.perf_counter()
    key = embeddings_key(ctx, cfg.embeddings)
    name = index_name(ctx)
    emb_uri, index_uri = paths.embeddings(key), paths.index(name)
    storage_config = ctx.config.storage

    # 1. Driver: file footers and the object_id column only.
    say(f"index {name}: reading {emb_uri}")
    files, emb_type = embedding_files(storage, emb_uri)
    object_ids = read_object_ids(storage, files)
    total = len(object_ids)
    pieces = scan_pieces(files)
    dim = fixed_dim(emb_type)
    if dim is None:  # variable-length lists: their dimension is the longest vector (costs one more read)
        dim = max(ray.get([max_length_task.remote(p, storage_config) for p in pieces]))
        if dim < 1:
            raise ArtsimError(f"embeddings: every vector in {emb_uri} is empty or null; nothing to index")
    batch_rows = batch_rows_for(dim)
    model_uri = join(emb_uri, "_model.json")
    model = storage.read_json(model_uri) if storage.exists(model_uri) else {}
    model = dict(model) if isinstance(model, dict) else {}
    model.setdefault("model_key", key)

    # 2. Candidates for the held-out tuning queries and the training sample, drawn before the scan so that one
    # read of the vectors finds them. Tuning queries are never training points, so recall is measured on unseen
    # vectors. Candidates whose row turns out not to be indexed (bad vector, repeated object_id) are dropped.
    rng = np.random.default_rng(cfg.seed)
    provisional = _plan(cfg, total, dim)  # at most as many rows as will be indexed: enough training candidates
    query_candidates = sample_rows(rng, total, min(cfg.tuning_queries, max(1, total // 10)), np.zeros(0, np.int64))
    train_candidates = np.zeros(0, np.int64)
    if provisional.kind != "flat":
        exclude = query_candidates if total - len(query_candidates) >= 1000 else np.zeros(0, np.int64)
        train_candidates = sample_rows(rng, total, max(cfg.train_sample, MIN_TRAIN_PER_LIST * provisional.nlist),
                                       exclude)

    # 3. Scan tasks: which rows hold a good vector; the candidates' vectors (training ones stay in the store).
    t0 = time.perf_counter()
    pending = {}
    for i, piece in enumerate(pieces):
        summary_ref, query_ref, train_ref = scan_task.remote(
            piece, dim, _rows_in(query_candidates, piece), _rows_in(train_candidates, piece), storage_config,
            batch_rows)
        pending[summary_ref] = (i, query_ref, train_ref)
    progress = Progress(f"index {name}: scanning", total=len(pieces), unit="pieces", interval=5.0)
    scans: list = [None] * len(pieces)
    refs = list(pending)
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        i, query_ref, train_ref = pending.pop(done[0])
        scans[i] = (ray.get(done[0]), ray.get(query_ref), train_ref)
        progress.update(1, f"({pieces[i].num_rows} rows)")
    scan_seconds = time.perf_counter() - t0
    good = np.concatenate([np.unpackbits(s["good"], count=s["num_rows"]).astype(bool) for s, _, _ in scans])
    off_norm = sum(s["off_norm"] for s, _, _ in scans)
    if off_norm:
        log.warning("embeddings: %d vectors were not L2-normalised; normalising them", off_norm)
    rows, skipped = first_good_rows(object_ids, good)
    n = len(rows)
    if n == 0:
        raise ArtsimError(f"embeddings: no row of {emb_uri} has a valid vector and object_id; nothing to index "
                          f"(skipped: {skipped})")
    kept_object_ids = object_ids.take(pa.array(rows))
    del object_ids, good

    # 4. Stable ids, index type, shards (contiguous row ranges of the directory, balanced by indexed rows).
    prev_manifest, prev_ids = _load_previous(storage, index_uri)
    ids, next_id, reused = assign_ids(kept_object_ids, prev_ids, (prev_manifest or {}).get("next_id", 0))
    plan = _plan(cfg, n, dim)
    shard_plans = plan_shards(files, rows, ids, cfg.num_shards)
    num_shards = len(shard_plans)
    shard_of = np.repeat(np.arange(num_shards, dtype=np.int32), [len(p.rows) for p in shard_plans])
    say(f"index {name}: {n} vectors of dimension {dim} -> {plan.factory} in {num_shards} shard(s) ({plan.reason})")
    records = None
    if storage.is_complete(paths.records):
        records = read_record_columns(storage, paths.records, cfg.facets, cfg.metadata)
    else:
        say(f"index {name}: no complete records/ in the run; facets other than collection will be empty")
    ids_table = id_table(ids, kept_object_ids, shard_of, records, cfg.facets, cfg.metadata)
    del records, kept_object_ids

    query_vectors = np.concatenate([q for _, q, _ in scans])
    usable = np.isin(query_candidates, rows)
    query_vectors = query_vectors[usable]
    n_queries = min(cfg.tuning_queries, max(1, n // 10), len(query_vectors))
    if n_queries < len(query_vectors):
        query_vectors = query_vectors[np.sort(rng.choice(len(query_vectors), size=n_queries, replace=False))]
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    if len(queries) == 0:
        raise ArtsimError(f"embeddings: none of the sampled tuning rows of {emb_uri} is indexable "
                          f"(skipped: {skipped}); too few good rows to tune")
    train_refs, train_masks = [], []
    if plan.kind != "flat":
        if provisional.kind == "flat":  # cannot happen: fewer rows never leave the exact regime
            raise ArtsimError("index: internal error: no training candidates were drawn for a trained index")
        for (_, _, train_ref), piece in zip(scans, pieces):
            mask = np.isin(_rows_in(train_candidates, piece), rows)
            if mask.any():
                train_refs.append(train_ref)
                train_masks.append(mask)
    n_train = int(sum(m.sum() for m in train_masks))
    del scans

    from artsim.runtime import fit_task, largest_node, node_shapes

    use_gpu = largest_node(node_shapes())[1] >= 1  # a GPU task needs a node that has one, not GPUs anywhere
    # one task, so one node: at most 8 threads, at most what the largest (GPU) node has
    threads = int(fit_task(want_cpus=8, gpus=1 if use_gpu else 0, what="index training (one task)", key="index"))
    t0 = time.perf_counter()
    trained = train_task.options(num_cpus=threads, num_gpus=1 if use_gpu else 0).remote(
        plan.factory, dim, train_refs, train_masks, use_gpu, threads)
    trained = ray.get(trained)  # the serialised trained index: small next to the vectors
    del train_refs  # the training candidates leave the object store
    train_seconds = time.perf_counter() - t0
    if plan.kind != "flat":
        say(f"index {name}: trained on {n_train} vectors in {train_seconds:.1f} s"
            f"{' (GPU)' if use_gpu else ''}")

    # 5. One task per shard: reads its own rows in batches, adds them, writes the shard, computes the truth.
    build_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    trained_ref, queries_ref = ray.put(trained), ray.put(queries)
    pending = {}
    for s, shard_plan in enumerate(shard_plans):
        rel = f"shards/{build_id}/shard-{s:05d}-of-{num_shards:05d}.faiss"
        ref = shard_task.remote(trained_ref, shard_plan, dim, join(index_uri, rel), storage_config, queries_ref,
                                batch_rows)
        pending[ref] = (s, rel)
    del shard_plans
    progress = Progress(f"index {name}: shards", total=num_shards, unit="shards", interval=5.0)
    shard_entries: list[Optional[dict]] = [None] * num_shards
    truths = []
    t0 = time.perf_counter()
    refs = list(pending)
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        result = ray.get(done[0])
        s, rel = pending[done[0]]
        shard_entries[s] = {"path": rel, "ntotal": result["ntotal"], "sha256": result["sha256"],
                            "bytes": result["bytes"]}
        truths.append((result["truth_scores"], result["truth_ids"]))
        progress.update(1, f"(shard {s}: {result['ntotal']} vectors, {result['add_seconds']:.1f} s)")
    add_seconds = time.perf_counter() - t0

    from artsim.serving.topk import merge_topk

    _, truth_ids = merge_topk(truths, TRUTH_K)
    t0 = time.perf_counter()
    tuning = ray.get(tune_task.options(num_cpus=threads).remote(
        index_uri, shard_entries, ctx.config.storage, queries_ref, truth_ids, cfg.target_recall, threads))
    tune_seconds = time.perf_counter() - t0
    if not tuning["target_reached"]:
        say(f"index {name}: WARNING: recall@10 target {cfg.target_recall} not reached; best is "
            f"{tuning['recall_at_10']} with {tuning['params']}")

    ids_bytes = _parquet_bytes(ids_table)
    import hashlib

    storage.write_bytes(join(index_uri, IDS), ids_bytes)
    total_seconds = time.perf_counter() - started
    manifest = {
        "format": FORMAT, "name": name, "build_id": build_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()),
        "dim": int(dim), "metric": METRIC, "factory": plan.factory, "kind": plan.kind, "nlist": plan.nlist,
        "ntotal": int(n), "next_id": int(next_id), "model": model, "embeddings": emb_uri,
        "search_params": tuning["params"],
        "shards": shard_entries,
        "ids": IDS, "ids_sha256": hashlib.sha256(ids_bytes).hexdigest(), "ids_bytes": len(ids_bytes),
        "facets": list(cfg.facets), "metadata": list(cfg.metadata),
        "recall_at_10": tuning["recall_at_10"], "latency_ms": tuning["latency"],
        "batch_ms_per_query": tuning["batch_ms_per_query"],
        "tuning": tuning,
        "build": {"seconds": round(total_seconds, 2), "train_seconds": round(train_seconds, 2),
                  "add_seconds": round(add_seconds, 2), "tune_seconds": round(tune_seconds, 2),
                  "scan_seconds": round(scan_seconds, 2), "files": len(files),
                  "train_vectors": n_train, "gpu": use_gpu, "reason": plan.reason,
                  "reused_ids": int(reused), "new_ids": int(n - reused), "skipped": skipped},
    }
    storage.write_json(join(index_uri, MANIFEST), manifest)  # last: readers see the new index only from here
    _delete_old_builds(storage, index_uri, keep={build_id, _build_of(prev_manifest)})

    summary = {"index_uri": index_uri, "name": name, "factory": plan.factory, "vectors": int(n), "dim": int(dim),
               "shards": num_shards, "reused_ids": int(reused), "new_ids": int(n - reused),
               "skipped": skipped, "search_params": tuning["params"], "recall_at_10": tuning["recall_at_10"],
               "latency_p50_ms": tuning["latency"]["p50_ms"], "seconds": round(total_seconds, 2),
               "vectors_per_second": round(n / max(total_seconds, 1e-9), 1)}
    table(["index", "vectors", "dim", "factory", "shards", "params", "recall@10", "p50 ms", "seconds"],
          [[name, n, dim, plan.factory, num_shards, tuning["params"] or "-", tuning["recall_at_10"],
            tuning["latency"]["p50_ms"], f"{total_seconds:.1f}"]])
    say(f"index {name}: {reused} ids kept from the previous build, {n - reused} new"
        + (f"; skipped {skipped}" if skipped else "") + f"; written to {index_uri}")
    return summary


def _parquet_bytes(tbl) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd")
    return buf.getvalue()


def _build_of(manifest: Optional[dict]) -> Optional[str]:
    if not manifest:
        return None
    path = manifest["shards"][0]["path"]
    parts = path.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "shards" else None


def _delete_old_builds(storage: Storage, index_uri: str, keep: set) -> None:
    for build in storage.list(join(index_uri, "shards")):
        if build not in keep:
            storage.delete(join(index_uri, "shards", build))
