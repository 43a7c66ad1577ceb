"""Exact top-k by blocked matrix products, merging of per-shard top-k lists, and recall@k.

These are the ground truth for tuning and tests, and the exact search over small filtered subsets in serving.
Scores are inner products (cosine similarity on L2-normalised vectors); higher is better. Empty slots carry id -1
and score -inf.
"""
from __future__ import annotations

import numpy as np

EMPTY_ID = -1


def exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int,
               block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries @ vectors.T``; returns (scores, ids) of shape (nq, k), best first."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = queries.shape[0]
    best_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    best_ids = np.full((nq, k), EMPTY_ID, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(vectors), block):
        chunk = np.asarray(vectors[start:start + block], dtype=np.float32)
        scores = queries @ chunk.T
        if scores.shape[1] > k:  # keep each query's k best of the chunk before merging: no (nq, block) id matrix
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, part, axis=1)
            chunk_ids = ids[start:start + block][part]
        else:
            chunk_ids = np.broadcast_to(ids[start:start + block], scores.shape)
        best_scores, best_ids = merge_topk([(best_scores, best_ids), (scores, chunk_ids)], k)
    return best_scores, best_ids


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) lists into one top-k per query, best first. Ties are broken by lower id so
    that results do not depend on the order shards answer in."""
    scores = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32, copy=False)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64, copy=False)
    scores = np.where(ids == EMPTY_ID, -np.inf, scores)
    nq, width = scores.shape
    if width > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((ids, -scores), axis=1) if scores.size else np.zeros(scores.shape, dtype=np.int64)
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.concatenate([scores, np.full((nq, pad), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((nq, pad), EMPTY_ID, np.int64)], axis=1)
    return scores, ids


RECALL_K = 10  # index tuning and its reports measure recall@10 (manifest "recall_at_10")


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k ids found in the returned top-k (ids of -1 never count)."""
    total, hits = 0, 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = set(int(x) for x in t if x != EMPTY_ID)
        if not t:
            continue
        total += len(t)
        hits += len(t & set(int(x) for x in f))
    return hits / total if total else 1.0
