"""Synthetic embeddings and records for tests and benchmarks of the index, serving and links stages.

Vectors are drawn around random cluster centres (like image embeddings, which cluster by style and subject), then
L2-normalised. Records carry facets with known distributions, so conditional queries have something to filter:
collection (``collections`` round-robin), culture (8 values), object_type (5), creator (50), license, and a
date_begin / date_end range.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from artsim.rundir.schema import empty_record, records_table

CULTURES = ("China", "Japan", "France", "Netherlands", "Italy", "Egypt", "Mexico", "Denmark")
OBJECT_TYPES = ("painting", "print", "drawing", "vase", "textile")
LICENSES = ("CC0", "PDM", "CC-BY-4.0")


def clustered_vectors(n: int, dim: int, n_clusters: int = 100, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 200_000  # bounded temporaries for large n
    for start in range(0, n, step):
        m = min(step, n - start)
        assign = rng.integers(0, n_clusters, m)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        block = centres[assign] + noise
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def object_ids_for(n: int, collections: Sequence[str] = ("met", "smk", "rijks"), start: int = 0) -> list[str]:
    return [f"{collections[i % len(collections)]}:{i}" for i in range(start, start + n)]


def records_for(object_ids: Sequence[str], seed: int = 0) -> pa.Table:
    """Canonical records with deterministic facets for ``object_ids`` (``<collection>:<number>``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for object_id in object_ids:
        collection, local = object_id.split(":", 1)
        r = empty_record()
        begin = int(rng.integers(1400, 1950))
        r.update(object_id=object_id, collection=collection, local_id=local, title=f"Work {local}",
                 creator=f"Artist {int(rng.integers(0, 50))}", culture=CULTURES[int(rng.integers(0, len(CULTURES)))],
                 object_type=OBJECT_TYPES[int(rng.integers(0, len(OBJECT_TYPES)))],
                 license=LICENSES[int(rng.integers(0, len(LICENSES)))], date_begin=begin,
                 date_end=begin + int(rng.integers(0, 30)), date=str(begin))
        rows.append(r)
    return records_table(rows)


def embeddings_table(object_ids: Sequence[str], vectors: np.ndarray, model: str = "test-model",
                     dtype=np.float32) -> pa.Table:
    dim = vectors.shape[1]
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.table({"object_id": pa.array(list(object_ids), pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
                     "model": pa.array([model] * len(object_ids), pa.string())})


def write_run(storage, paths, object_ids: Sequence[str], vectors: np.ndarray, model_key: str = "test-model",
              records: Optional[pa.Table] = None, dtype=np.float32) -> None:
    """Write embeddings/<model_key>/ (+ _model.json) and records/ as the embed and ingest stages would."""
    storage.write_table(embeddings_table(object_ids, vectors, model_key, dtype), paths.embeddings(model_key))
    storage.write_json(f"{paths.embeddings(model_key)}/_model.json",
                       {"name": model_key, "model_key": model_key, "output_dim": int(vectors.shape[1]),
                        "dtype": np.dtype(dtype).name})
    storage.write_table(records if records is not None else records_for(object_ids), paths.records)
