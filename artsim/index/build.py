"""Plain (Ray-free) steps of building an index: read embeddings, assign stable ids, attach facets, train, add.

Everything here takes and returns numpy arrays, pyarrow tables and bytes, so it is tested without Ray; the Ray
layer in ``artsim/index/__init__.py`` only decides where each step runs.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.errors import ArtsimError, ConfigError
from artsim.index.shards import sha256_file
from artsim.index.topk import exact_topk

log = logging.getLogger("artsim.index")
NORM_TOLERANCE = 1e-2  # embeddings are stored L2-normalised; float16 storage moves norms by ~1e-3


@dataclass
class Embeddings:
    object_ids: np.ndarray  # object (str) array, unique
    vectors: np.ndarray  # (N, dim) float32, L2-normalised
    skipped: dict  # reason -> count of rows not indexed (bad vectors, duplicates)


def embeddings_from_table(table: pa.Table) -> Embeddings:
    """Validate the embeddings table; rows with a non-finite or zero vector, or a repeated object_id, are skipped
    (counted by reason) rather than failing the whole build."""
    for column in ("object_id", "embedding"):
        if column not in table.column_names:
            raise ArtsimError(f"embeddings: missing column {column!r} (found {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise ArtsimError("embeddings: the table is empty; nothing to index")
    emb = table.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(emb.type):
        dim = emb.type.list_size
        values = emb.flatten() if emb.null_count == 0 else None
    elif pa.types.is_list(emb.type) or pa.types.is_large_list(emb.type):
        lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
        dim = int(np.nanmax(lengths)) if len(lengths) else 0
        values = emb.flatten() if emb.null_count == 0 and np.all(lengths == dim) else None
    else:
        raise ArtsimError(f"embeddings: column 'embedding' must be a list of floats, got {emb.type}")
    if values is not None:
        vectors = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        valid_shape = np.ones(len(vectors), dtype=bool)
    else:  # nulls or ragged rows: go row by row and mark the bad ones
        vectors = np.zeros((table.num_rows, dim), dtype=np.float32)
        valid_shape = np.zeros(table.num_rows, dtype=bool)
        for i, row in enumerate(emb.to_pylist()):
            if row is not None and len(row) == dim and all(v is not None for v in row):
                vectors[i] = row
                valid_shape[i] = True
    object_ids = np.asarray(table.column("object_id").to_pylist(), dtype=object)
    skipped: dict[str, int] = {}
    norms = np.linalg.norm(vectors, axis=1)
    finite = np.isfinite(vectors).all(axis=1)
    good = valid_shape & finite & (norms > 0) & np.array([isinstance(o, str) and o != "" for o in object_ids])
    _count(skipped, "bad_vector_or_id", int((~good).sum()))
    off_norm = good & (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if off_norm.any():
        # Not normalised upstream: normalise here so that inner product stays cosine similarity.
        log.warning("embeddings: %d vectors were not L2-normalised; normalising them", int(off_norm.sum()))
        vectors[off_norm] /= norms[off_norm, None]
    rows = np.nonzero(good)[0]
    _, first = np.unique(object_ids[rows].astype(str), return_index=True)
    keep = np.sort(rows[first])
    _count(skipped, "duplicate_object_id", len(rows) - len(keep))
    return Embeddings(object_ids[keep], np.ascontiguousarray(vectors[keep]), skipped)


def _count(d: dict, key: str, n: int) -> None:
    if n:
        d[key] = d.get(key, 0) + n


def assign_ids(object_ids: np.ndarray, previous: Optional[pa.Table], previous_next_id: int = 0
               ) -> tuple[np.ndarray, int, int]:
    """FAISS ids for ``object_ids``: an object indexed before keeps its id; new objects get ids above every id
    ever handed out (``previous_next_id``), so a retired id is never reused for another work.

    Returns (ids, next_id, reused_count)."""
    next_id = int(previous_next_id)
    known: dict[str, int] = {}
    if previous is not None and previous.num_rows:
        old_ids = previous.column("id").to_numpy()
        known = dict(zip(previous.column("object_id").to_pylist(), old_ids.tolist()))
        next_id = max(next_id, int(old_ids.max()) + 1)
    ids = np.empty(len(object_ids), dtype=np.int64)
    reused = 0
    for i, object_id in enumerate(object_ids):
        old = known.get(object_id)
        if old is None:
            ids[i] = next_id
            next_id += 1
        else:
            ids[i] = old
            reused += 1
    return ids, next_id, reused


def id_table(ids: np.ndarray, object_ids: np.ndarray, shard_of: np.ndarray, records: Optional[pa.Table],
             facets: list[str], metadata: list[str]) -> pa.Table:
    """ids.parquet: id, object_id, shard, facet columns, metadata columns; sorted by id.

    Facets and metadata come from records/ (left join on object_id; a work without a record gets nulls, and its
    collection from its object_id prefix)."""
    table = pa.table({"id": pa.array(ids, pa.int64()), "object_id": pa.array(object_ids.tolist(), pa.string()),
                      "shard": pa.array(shard_of, pa.int32())})
    wanted = [c for c in dict.fromkeys(list(facets) + list(metadata)) if c not in ("id", "object_id", "shard")]
    if records is not None:
        for c in wanted:
            if c not in records.column_names:
                key = "index.facets" if c in facets else "index.metadata"
                raise ConfigError(key, f"column {c!r} is not in records/ (it has {', '.join(records.column_names)})")
        rec_ids = records.column("object_id").to_numpy(zero_copy_only=False).astype(str)
        _, first = np.unique(rec_ids, return_index=True)  # a repeated record: the first one wins
        records = records.take(pa.array(np.sort(first)))
        positions = pc.index_in(table.column("object_id"), value_set=records.column("object_id"))
        for c in wanted:
            col = records.column(c).combine_chunks()
            if pa.types.is_list(col.type):  # list columns (subjects) cannot be facets of a row filter
                col = pc.binary_join(col, "|")
            table = table.append_column(c, col.take(positions))
    else:
        for c in wanted:
            dtype = pa.int32() if c in ("date_begin", "date_end") else pa.string()
            table = table.append_column(c, pa.nulls(table.num_rows, dtype))
    if "collection" in table.column_names:
        prefix = pa.array([o.split(":", 1)[0] if ":" in o else None for o in object_ids.tolist()], pa.string())
        table = table.set_column(table.column_names.index("collection"), "collection",
                                 pc.coalesce(table.column("collection"), prefix))
    return table.sort_by("id")


# -- FAISS ------------------------------------------------------------------------------------------------------


def empty_index(factory: str, dim: int) -> faiss.Index:
    """An untrained index that accepts add_with_ids (non-IVF types are wrapped in IDMap2)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError("index.factory", f"FAISS cannot build {factory!r}: {str(exc).splitlines()[0]}") from None
    if faiss.try_extract_index_ivf(index) is None and not isinstance(
            faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def train_index(factory: str, dim: int, sample: np.ndarray, use_gpu: bool = False) -> np.ndarray:
    """Train an empty index on ``sample``; returns it serialised (uint8 array) for the shard builders.

    IVF indexes get a hash-table direct map so that serving can reconstruct any vector by id (exact search over a
    small filtered subset, queries by object id). With a GPU, k-means runs on it (the usual faiss recipe)."""
    index = empty_index(factory, dim)
    ivf = faiss.try_extract_index_ivf(index)
    if not index.is_trained:
        if use_gpu and ivf is not None and faiss.get_num_gpus() > 0:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        if ivf is not None:
            ivf.clustering_index = None
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return faiss.serialize_index(index)


@dataclass
class ShardResult:
    local_path: str
    ntotal: int
    sha256: str
    bytes: int
    add_seconds: float
    truth_scores: Optional[np.ndarray] = None
    truth_ids: Optional[np.ndarray] = None


def build_shard(trained: np.ndarray, vectors: np.ndarray, ids: np.ndarray, out_dir: str,
                queries: Optional[np.ndarray] = None, k_truth: int = 10) -> ShardResult:
    """Add one shard's vectors to a copy of the trained index and write it to ``out_dir``.

    Also computes the exact top-k of ``queries`` over this shard's vectors: merged across shards, that is the
    ground truth for tuning, computed where the vectors already are."""
    start = time.perf_counter()
    index = faiss.deserialize_index(trained)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    add_seconds = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".faiss", dir=out_dir)
    os.close(fd)
    faiss.write_index(index, path)
    truth_scores = truth_ids = None
    if queries is not None and len(queries):
        truth_scores, truth_ids = exact_topk(queries, vectors, ids, k_truth)
    return ShardResult(path, int(index.ntotal), sha256_file(path), os.path.getsize(path), add_seconds,
                       truth_scores, truth_ids)
