"""Ray tasks of the index stage: thin wrappers that run build.py / tuning.py steps where Ray places them.

Kept apart from artsim/index/__init__.py so that serving (`artsim query`) never imports Ray.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import ray

from artsim.index.build import build_shard, train_index
from artsim.storage import Storage, join

TRUTH_K = 10


@ray.remote
def train_task(factory: str, dim: int, sample: np.ndarray, use_gpu: bool, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    return train_index(factory, dim, sample, use_gpu=use_gpu)


@ray.remote
def shard_task(trained, vectors: np.ndarray, ids: np.ndarray, shard_uri: str, storage_config, queries):
    storage = Storage(storage_config)
    tmp = tempfile.mkdtemp(prefix="artsim-shard-")
    try:
        result = build_shard(trained, vectors, ids, tmp, queries, TRUTH_K)
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

    from artsim.index.shards import ShardSet, read_shard, verify_file
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
