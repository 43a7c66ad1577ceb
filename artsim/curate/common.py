"""Shared helpers for the curator outputs: checked embedding matrices, exact nearest neighbours, record lookup."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import pyarrow as pa

from artsim.errors import ArtsimError


def checked_vectors(vectors, vector_ids: Iterable[str], what: str = "vectors") -> tuple[np.ndarray, list[str]]:
    """(N, D) float32, rows L2-normalised, with N unique ids; anything else is an ArtsimError.

    Rows are re-normalised here (cheap) so that inner product is cosine similarity even when a caller passes raw
    features; an all-zero row cannot be normalised and is rejected rather than silently matching nothing.
    """
    ids = [str(i) for i in vector_ids]
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ArtsimError(f"{what}: expected an (N, D) matrix, got shape {matrix.shape}")
    if matrix.shape[0] != len(ids):
        raise ArtsimError(f"{what}: {matrix.shape[0]} rows but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ArtsimError(f"{what}: object ids are not unique")
    if not np.isfinite(matrix).all():
        raise ArtsimError(f"{what}: contains NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if matrix.shape[0] and (norms <= 1e-12).any():
        bad = ids[int(np.flatnonzero(norms[:, 0] <= 1e-12)[0])]
        raise ArtsimError(f"{what}: the vector of {bad!r} is all zeros")
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32), ids


def nearest_neighbors(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN of every row among the other rows: (scores, indices), each (N, k'), k' = min(k, N - 1).

    Self matches are removed by index, not by position: with duplicate vectors the row itself need not rank first.
    """
    import faiss

    n = vectors.shape[0]
    k_eff = int(min(k, n - 1))
    if k_eff <= 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, idx = index.search(vectors, k_eff + 1)
    out_s = np.zeros((n, k_eff), np.float32)
    out_i = np.zeros((n, k_eff), np.int64)
    for row in range(n):
        keep = idx[row] != row
        s, i = scores[row][keep][:k_eff], idx[row][keep][:k_eff]
        out_s[row, :len(s)], out_i[row, :len(i)] = s, i
    return out_s, out_i


def records_by_id(records) -> dict[str, dict]:
    """object_id -> record dict, from a pyarrow table in the canonical schema or a list of record dicts."""
    if isinstance(records, pa.Table):
        if "object_id" not in records.schema.names:
            raise ArtsimError("records: no object_id column")
        rows = records.to_pylist()
    else:
        rows = list(records)
    out: dict[str, dict] = {}
    for row in rows:
        object_id = row.get("object_id")
        if object_id:
            out[str(object_id)] = row
    return out


def norm_text(value: Optional[str]) -> str:
    """Case- and whitespace-insensitive key for free-text tags ("Portraits " == "portraits")."""
    return " ".join(str(value or "").split()).casefold()
