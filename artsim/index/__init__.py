"""The index stage: embeddings/<model_key>/ -> index/<name>/ (manifest.json, ids.parquet, shards/).

`run_index(ctx)` is the thin Ray layer: it reads the embeddings, assigns stable ids and picks the index type on the
driver (plain functions in build.py / factory.py), then runs the heavy steps as Ray tasks:

1. train (k-means / quantizer training on a sample; on a GPU when the cluster has one),
2. one task per shard: add that shard's vectors to a copy of the trained index, write the shard to storage, and
   compute the exact top-10 of the held-out tuning queries over the shard (the merged ground truth),
3. tune: load the written shards, sweep nprobe / efSearch, keep the cheapest setting reaching target recall.

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
from artsim.errors import ConfigError, IntegrityError
from artsim.index.build import assign_ids, embeddings_from_table, id_table
from artsim.index.factory import IndexPlan, choose_factory, kind_of_factory, nlist_for
from artsim.index.manifest import FORMAT, IDS, MANIFEST, METRIC, validate_manifest
from artsim.storage import Storage, join

log = logging.getLogger("artsim.index")
TRUTH_K = 10  # recall@10 is what tuning measures
MIN_TRAIN_PER_LIST = 40

__all__ = ["run_index", "embeddings_key"]


def embeddings_key(ctx) -> str:
    """Which embeddings/<key>/ to index: index.embeddings, else the embed section's model key, else the only
    complete embeddings directory in the run."""
    storage, paths = ctx.storage, ctx.paths
    if ctx.config.index.embeddings:
        return ctx.config.index.embeddings
    key = None
    try:
        from artsim.embed.artifact import model_key

        key = model_key(ctx.config.embed)
    except ImportError:  # the embed package is optional for indexing vectors written by other tools
        pass
    if key and storage.is_complete(paths.embeddings(key)):
        return key
    base = join(paths.root, "embeddings")
    found = [c for c in storage.list(base) if not c.startswith((".", "_")) and storage.is_complete(join(base, c))]
    if key is None and len(found) == 1:
        return found[0]
    where = paths.embeddings(key) if key else base
    raise ConfigError("index.embeddings", f"no complete embeddings at {where} (found: {', '.join(found) or 'none'});"
                                          " run the embed stage or set index.embeddings")


def _load_previous(storage: Storage, index_uri: str):
    """The previous build's (manifest, ids table), verified, or (None, None) when there is none."""
    import pyarrow.parquet as pq

    from artsim.index.shards import verify_file

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


def run_index(ctx, **options) -> dict:
    import ray

    from artsim.index.ray_tasks import shard_task, train_task, tune_task
    from artsim.runtime import ensure_ray

    ensure_ray(ctx.config)
    cfg = ctx.config.index
    storage, paths = ctx.storage, ctx.paths
    started = time.perf_counter()
    key = embeddings_key(ctx)
    name = cfg.name or key
    emb_uri, index_uri = paths.embeddings(key), paths.index(name)

    say(f"index {name}: reading {emb_uri}")
    emb = embeddings_from_table(storage.read_table(emb_uri, columns=["object_id", "embedding"]))
    n, dim = emb.vectors.shape
    model_uri = join(emb_uri, "_model.json")
    model = storage.read_json(model_uri) if storage.exists(model_uri) else {}
    model = dict(model) if isinstance(model, dict) else {}
    model.setdefault("model_key", key)

    prev_manifest, prev_ids = _load_previous(storage, index_uri)
    ids, next_id, reused = assign_ids(emb.object_ids, prev_ids, (prev_manifest or {}).get("next_id", 0))
    order = np.argsort(ids, kind="stable")  # shard contents in id order: the same input gives the same shards
    ids, object_ids, vectors = ids[order], emb.object_ids[order], emb.vectors[order]
    num_shards = min(cfg.num_shards, n)
    shard_of = (np.arange(n) % num_shards).astype(np.int32)

    plan = _plan(cfg, n, dim)
    say(f"index {name}: {n} vectors of dimension {dim} -> {plan.factory} in {num_shards} shard(s) ({plan.reason})")
    records = None
    if storage.is_complete(paths.records):
        records = storage.read_table(paths.records)
    else:
        say(f"index {name}: no complete records/ in the run; facets other than collection will be empty")
    ids_table = id_table(ids, object_ids, shard_of, records, cfg.facets, cfg.metadata)

    # Held-out tuning queries are never training points, so recall is measured on unseen vectors.
    rng = np.random.default_rng(cfg.seed)
    n_queries = min(cfg.tuning_queries, max(1, n // 10))
    query_rows = rng.choice(n, size=n_queries, replace=False)
    queries = vectors[np.sort(query_rows)]
    train_pool = np.setdiff1d(np.arange(n), query_rows) if n - n_queries >= 1000 else np.arange(n)
    n_train = min(len(train_pool), max(cfg.train_sample, MIN_TRAIN_PER_LIST * plan.nlist))
    train_rows = np.sort(rng.choice(train_pool, size=n_train, replace=False))
    sample = vectors[train_rows] if plan.kind != "flat" else vectors[:0]

    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    threads = max(1, min(cluster_cpus, 8))
    t0 = time.perf_counter()
    trained = train_task.options(num_cpus=threads, num_gpus=1 if use_gpu else 0).remote(
        plan.factory, dim, ray.put(sample), use_gpu, threads)
    trained = ray.get(trained)  # the serialised trained index: small next to the vectors
    train_seconds = time.perf_counter() - t0
    if plan.kind != "flat":
        say(f"index {name}: trained on {len(sample)} vectors in {train_seconds:.1f} s"
            f"{' (GPU)' if use_gpu else ''}")

    build_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    trained_ref, queries_ref = ray.put(trained), ray.put(queries)
    pending = {}
    for s in range(num_shards):
        rows = np.nonzero(shard_of == s)[0]
        rel = f"shards/{build_id}/shard-{s:05d}-of-{num_shards:05d}.faiss"
        ref = shard_task.remote(trained_ref, ray.put(vectors[rows]), ray.put(ids[rows]), join(index_uri, rel),
                                 ctx.config.storage, queries_ref)
        pending[ref] = (s, rel)
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

    from artsim.index.topk import merge_topk

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
                  "train_vectors": int(len(sample)), "gpu": use_gpu, "reason": plan.reason,
                  "reused_ids": int(reused), "new_ids": int(n - reused), "skipped": emb.skipped},
    }
    storage.write_json(join(index_uri, MANIFEST), manifest)  # last: readers see the new index only from here
    _delete_old_builds(storage, index_uri, keep={build_id, _build_of(prev_manifest)})

    summary = {"index_uri": index_uri, "name": name, "factory": plan.factory, "vectors": int(n), "dim": int(dim),
               "shards": num_shards, "reused_ids": int(reused), "new_ids": int(n - reused),
               "skipped": emb.skipped, "search_params": tuning["params"], "recall_at_10": tuning["recall_at_10"],
               "latency_p50_ms": tuning["latency"]["p50_ms"], "seconds": round(total_seconds, 2),
               "vectors_per_second": round(n / max(total_seconds, 1e-9), 1)}
    table(["index", "vectors", "dim", "factory", "shards", "params", "recall@10", "p50 ms", "seconds"],
          [[name, n, dim, plan.factory, num_shards, tuning["params"] or "-", tuning["recall_at_10"],
            tuning["latency"]["p50_ms"], f"{total_seconds:.1f}"]])
    say(f"index {name}: {reused} ids kept from the previous build, {n - reused} new"
        + (f"; skipped {emb.skipped}" if emb.skipped else "") + f"; written to {index_uri}")
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
