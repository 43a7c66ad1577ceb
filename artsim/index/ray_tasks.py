"""Ray tasks of the index stage: thin wrappers that run build.py / tuning.py steps where Ray places them.

Every task that needs vectors reads them itself from storage (local or S3): the driver passes file pieces, row
positions and ids, never vectors (apart from the few hundred tuning queries).

Kept apart from artsim/index/__init__.py so that serving (`artsim query`) never imports Ray.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import ray

from artsim.index.build import (Piece, ShardPlan, build_shard, max_length_of_piece, read_shard_vectors, scan_piece,
                                train_index)
from artsim.serving.topk import RECALL_K
from artsim.storage import Storage, join



@ray.remote
def max_length_task(piece: Piece, storage_config) -> int:
    return max_length_of_piece(Storage(storage_config), piece)


@ray.remote(num_returns=4)
def scan_task(piece: Piece, dim: int, query_rows: np.ndarray, train_rows: np.ndarray, storage_config,
              batch_rows: int):
    """Returns (summary for the driver, one bit per row: a good vector, vectors at query_rows, vectors at
    train_rows). The driver fetches the summary and the query vectors; the good-row bits stay in the object store
    for the plan task, the training candidates for the train task."""
    result = scan_piece(Storage(storage_config), piece, dim, [query_rows, train_rows], batch_rows)
    summary = {"num_rows": result.num_rows, "good_rows": int(result.good.sum()), "off_norm": result.off_norm}
    return summary, np.packbits(result.good), result.picked[0], result.picked[1]


@ray.remote
def plan_task(cfg, storage_config, plan_args: dict, good_refs: list, records_uri: Optional[str],
              previous_manifest: Optional[dict], max_shards: int):
    """The build plan, made where the per-row data may live (not the driver): reads the object_id column, the
    scan's good-row bits, the previous build's id map and the facet / metadata columns of records/, runs
    ``plan_build``, and returns ``1 + 1 + max_shards`` objects: the plan without its per-row parts (for the
    driver), ids.parquet's bytes (for ``write_ids_task``) and each shard's ShardPlan (None past the last shard),
    which the shard tasks get straight from the object store."""
    from artsim.index.build import read_object_ids, read_record_columns
    from artsim.index.plan import plan_build
    from artsim.index.publish import load_previous_ids, parquet_bytes

    storage = Storage(storage_config)
    pieces = plan_args["pieces"]
    object_ids = read_object_ids(storage, plan_args["files"])
    good = np.concatenate([np.unpackbits(bits, count=piece.num_rows).astype(bool)
                           for bits, piece in zip(ray.get(good_refs), pieces)])
    records = read_record_columns(storage, records_uri, cfg.facets, cfg.metadata) if records_uri else None
    plan = plan_build(cfg, object_ids=object_ids, good=good, records=records,
                      previous_ids=load_previous_ids(storage, plan_args["index_uri"], previous_manifest),
                      previous_next_id=(previous_manifest or {}).get("next_id", 0), **plan_args)
    del object_ids, good, records
    shards = list(plan.shards) + [None] * (max_shards - len(plan.shards))
    return (plan.without_rows(), parquet_bytes(plan.ids_table), *shards)


@ray.remote
def write_ids_task(storage_config, index_uri: str, ids_parquet: bytes):
    """Write ids.parquet; returns its (sha256, size) for the manifest."""
    from artsim.index.publish import write_ids

    return write_ids(Storage(storage_config), index_uri, ids_parquet)


@ray.remote
def train_task(factory: str, dim: int, sample_parts: list, use_mask: list, use_gpu: bool, threads: int):
    """``sample_parts``: object refs of the scan tasks' training candidates; ``use_mask``: which of each part's rows
    to train on (the candidates whose row is indexed). Nothing to fetch for an index that needs no training."""
    import faiss

    faiss.omp_set_num_threads(threads)
    parts = [np.asarray(ray.get(ref))[mask] for ref, mask in zip(sample_parts, use_mask) if mask.any()]
    sample = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
    del parts
    return train_index(factory, dim, sample, use_gpu=use_gpu)


@ray.remote
def shard_task(trained, plan: ShardPlan, dim: int, shard_uri: str, storage_config, queries, batch_rows: int):
    storage = Storage(storage_config)
    tmp = tempfile.mkdtemp(prefix="artsim-shard-")
    try:
        result = build_shard(trained, read_shard_vectors(storage, plan, dim, batch_rows), tmp, queries, RECALL_K)
        storage.upload_file(result.local_path, shard_uri)
        return {"ntotal": result.ntotal, "sha256": result.sha256, "bytes": result.bytes,
                "add_seconds": result.add_seconds, "truth_scores": result.truth_scores,
                "truth_ids": result.truth_ids}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@ray.remote
def tune_task(index_uri: str, shard_entries: list[dict], storage_config, queries, truth_ids, target: float,
               threads: int):
    import faiss

    from artsim.serving.shards import ShardSet, read_shard, verify_file
    from artsim.index.tuning import tune

    faiss.omp_set_num_threads(threads)
    storage = Storage(storage_config)
    tmp = tempfile.mkdtemp(prefix="artsim-tune-")
    try:
        shards = []
        for i, entry in enumerate(shard_entries):
            path = os.path.join(tmp, f"shard-{i}.faiss")
            storage.download_file(join(index_uri, entry["path"]), path)
            verify_file(path, entry["sha256"], entry["bytes"])
            shards.append(read_shard(path, mmap=False))
        shard_set = ShardSet(shards)
        try:
            return tune(shard_set, queries, truth_ids, target)
        finally:
            shard_set.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
