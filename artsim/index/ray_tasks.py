"""Ray tasks of the index stage: thin wrappers that run build.py / tuning.py steps where Ray places them.

Every task that needs vectors reads them itself from storage (local or S3): the driver passes file pieces, row
positions and ids, never vectors (apart from the few hundred tuning queries).

Kept apart from artsim/index/__init__.py so that serving (`artsim query`) never imports Ray.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import ray

from artsim.index.build import (Piece, ShardPlan, build_shard, max_length_of_piece, read_shard_vectors, scan_piece,
                                train_index)
from artsim.serving.topk import RECALL_K
from artsim.storage import Storage, join



@ray.remote
def max_length_task(piece: Piece, storage_config) -> int:
    return max_length_of_piece(Storage(storage_config), piece)


@ray.remote(num_returns=3)
def scan_task(piece: Piece, dim: int, query_rows: np.ndarray, train_rows: np.ndarray, storage_config,
              batch_rows: int):
    """Returns (summary for the driver, vectors at query_rows, vectors at train_rows). The driver fetches only the
    first two; the training candidates stay in the object store until the train task reads them."""
    result = scan_piece(Storage(storage_config), piece, dim, [query_rows, train_rows], batch_rows)
    summary = {"num_rows": result.num_rows, "good": np.packbits(result.good), "off_norm": result.off_norm}
    return summary, result.picked[0], result.picked[1]


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
