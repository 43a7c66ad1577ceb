"""The index stage: embeddings/<model_key>/ -> index/<name>/ (manifest.json, ids.parquet, shards/).

`run_index(ctx)` reads footers, then: ``plan.plan_sampling`` -> ``execute.scan`` (Ray) -> ``execute.make_plan``
(a Ray task running the pure ``plan.plan_build``) -> ``execute.execute`` (Ray) -> ``publish.write_ids`` (Ray) and
``publish.write_manifest``. The driver holds nothing per row — no vectors, no object ids, no id map — so its memory
does not grow with the collection (benchmarks/scale_driver.py); everything per row runs in Ray tasks that read
their inputs from storage or the object store themselves:

1. scan: one task per piece (<= 1M rows of one file) marks which rows hold a good vector (bits kept in the object
   store) and returns the vectors of the sampled tuning-query rows (the training ones stay in the object store);
2. plan task: reads the object_id column, the previous id map and the records/ facets; skipped rows (bad vector or
   id, repeated object_id), stable ids (`assign_ids`), index type, shards as contiguous, row-balanced runs of the
   directory (`plan_shards`) and ids.parquet; the driver gets the plan without the rows, the rest stays in the
   object store;
3. train (k-means / quantizer training on the sample; on a GPU when the cluster has one);
4. one task per shard: read the shard's rows batch by batch, add them to a copy of the trained index, write the
   shard to storage, and compute the exact top-10 of the tuning queries over the shard (the merged ground truth);
5. tune: load the written shards, sweep nprobe / efSearch, keep the cheapest setting reaching target recall.

Then ids.parquet and, last, manifest.json are written. Shards live under shards/<build_id>/, so a reader holding
the previous manifest keeps reading the previous build's shards; builds older than the previous one are deleted.
"""
from __future__ import annotations

import logging

# faiss announces at INFO which CPU build it loads (and that the AVX512 one is missing); `artsim query` users
# would see that on every call. Warnings and errors still come through.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import time

from artsim.console import say, table
from artsim.errors import ArtsimError
from artsim.index.build import batch_rows_for, check_record_columns, embedding_files, scan_pieces
from artsim.rundir.embeddings import fixed_dim
from artsim.rundir.names import embeddings_key, index_name
from artsim.storage import join

__all__ = ["run_index"]


def run_index(ctx, **options) -> dict:
    """Build the index; the driver holds footers, samples and plans, nothing per row (see docs/index.md)."""
    from artsim.index import execute as ray_layer
    from artsim.index.plan import plan_sampling
    from artsim.index.publish import load_previous_manifest, write_manifest
    from artsim.index.ray_tasks import write_ids_task
    from artsim.runtime import ensure_ray

    ensure_ray(ctx.config)
    cfg = ctx.config.index
    storage, paths, storage_config = ctx.storage, ctx.paths, ctx.config.storage
    started = time.perf_counter()
    key = embeddings_key(ctx, cfg.embeddings)
    name = index_name(ctx)
    emb_uri, index_uri = paths.embeddings(key), paths.index(name)

    # 1. Driver: file footers only (the object_id column is read by the plan task).
    say(f"index {name}: reading {emb_uri}")
    files, emb_type = embedding_files(storage, emb_uri)
    total_rows = sum(f.num_rows for f in files)
    pieces = scan_pieces(files)
    dim = fixed_dim(emb_type)
    if dim is None:  # variable-length lists: their dimension is the longest vector (costs one more read)
        dim = ray_layer.max_dim(pieces, storage_config)
        if dim < 1:
            raise ArtsimError(f"embeddings: every vector in {emb_uri} is empty or null; nothing to index")
    batch_rows = batch_rows_for(dim)
    model_uri = join(emb_uri, "_model.json")
    model = storage.read_json(model_uri) if storage.exists(model_uri) else {}
    model = dict(model) if isinstance(model, dict) else {}
    model.setdefault("model_key", key)
    records_uri = paths.records if storage.is_complete(paths.records) else None
    if records_uri:
        check_record_columns(storage, records_uri, cfg.facets, cfg.metadata)  # a bad facet fails before the scan
    else:
        say(f"index {name}: no complete records/ in the run; facets other than collection will be empty")
    prev_manifest = load_previous_manifest(storage, index_uri)

    # 2. Sampled rows, drawn before the scan so that one read of the vectors finds them; 3. the scan.
    sampling = plan_sampling(cfg, total_rows, dim)
    scanned = ray_layer.scan(name, pieces, dim, sampling, storage_config, batch_rows)

    # 4. The plan (a Ray task): rows, stable ids, index type, shards, id map; the driver gets it without the rows.
    plan_args = {"name": name, "index_uri": index_uri, "emb_uri": emb_uri, "dim": dim, "files": files,
                 "pieces": pieces, "sampling": sampling, "query_vectors": scanned.query_vectors}
    plan, shard_refs, ids_ref = ray_layer.make_plan(cfg, plan_args, scanned, storage_config, records_uri,
                                                    prev_manifest)
    say(f"index {name}: {plan.n} vectors of dimension {dim} -> {plan.index.factory} in {len(shard_refs)} "
        f"shard(s) ({plan.index.reason})")

    # 5. Train, shards, tune (Ray), then publish.
    result = ray_layer.execute(plan, shard_refs, scanned, storage_config, cfg.target_recall, batch_rows)
    del shard_refs
    tuning = result.tuning
    if not tuning["target_reached"]:
        say(f"index {name}: WARNING: recall@10 target {cfg.target_recall} not reached; best is "
            f"{tuning['recall_at_10']} with {tuning['params']}")
    total_seconds = time.perf_counter() - started
    seconds = {"seconds": total_seconds, "train_seconds": result.train_seconds, "add_seconds": result.add_seconds,
               "tune_seconds": result.tune_seconds, "scan_seconds": scanned.seconds}
    ids_file = ray_layer.get_unwrapped(write_ids_task.remote(storage_config, index_uri, ids_ref))
    del ids_ref
    write_manifest(storage, plan, result, model, cfg.facets, cfg.metadata, seconds, len(files), prev_manifest,
                   ids_file)

    n, reused, skipped = plan.n, plan.reused_ids, plan.skipped
    summary = {"index_uri": index_uri, "name": name, "factory": plan.index.factory, "vectors": int(n),
               "dim": int(dim), "shards": len(plan.shard_sizes), "reused_ids": int(reused), "new_ids": int(n - reused),
               "skipped": skipped, "search_params": tuning["params"], "recall_at_10": tuning["recall_at_10"],
               "latency_p50_ms": tuning["latency"]["p50_ms"], "seconds": round(total_seconds, 2),
               "vectors_per_second": round(n / max(total_seconds, 1e-9), 1)}
    table(["index", "vectors", "dim", "factory", "shards", "params", "recall@10", "p50 ms", "seconds"],
          [[name, n, dim, plan.index.factory, len(plan.shard_sizes), tuning["params"] or "-", tuning["recall_at_10"],
            tuning["latency"]["p50_ms"], f"{total_seconds:.1f}"]])
    say(f"index {name}: {reused} ids kept from the previous build, {n - reused} new"
        + (f"; skipped {skipped}" if skipped else "") + f"; written to {index_uri}")
    return summary
