"""Plain (Ray-free) steps of building an index: read embeddings, assign stable ids, attach facets, train, add.

Everything here takes and returns numpy arrays, pyarrow tables and bytes, so it is tested without Ray; the Ray
layer in ``artsim/index/stage.py`` only decides where each step runs.
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
from artsim.rundir.embeddings import (check_embedding_type, first_good_rows, fixed_dim, max_list_length,
                                      vector_batch)
from artsim.rundir.names import collections_of
from artsim.serving.shards import sha256_file
from artsim.serving.topk import exact_topk, merge_topk

log = logging.getLogger("artsim.index")


@dataclass
class Embeddings:
    object_ids: np.ndarray  # object (str) array, unique
    vectors: np.ndarray  # (N, dim) float32, L2-normalised
    skipped: dict  # reason -> count of rows not indexed (bad vectors, duplicates)


def embeddings_from_table(table: pa.Table) -> Embeddings:
    """Validate the embeddings table; rows with a non-finite or zero vector, or a repeated object_id, are skipped
    (counted by reason) rather than failing the whole build.

    The whole table in memory: for tests and small tables. The index stage streams instead (``scan_piece``,
    ``read_shard_vectors``) with the same rules (``vector_batch`` and ``first_good_rows``)."""
    for column in ("object_id", "embedding"):
        if column not in table.column_names:
            raise ArtsimError(f"embeddings: missing column {column!r} (found {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise ArtsimError("embeddings: the table is empty; nothing to index")
    emb = table.column("embedding").combine_chunks()
    check_embedding_type(emb.type)
    dim = fixed_dim(emb.type) or max_list_length(emb)
    vectors, good, off_norm = vector_batch(emb, dim)
    if off_norm:
        log.warning("embeddings: %d vectors were not L2-normalised; normalising them", off_norm)
    object_ids = pa.array(table.column("object_id").to_pylist(), pa.string())
    keep, skipped = first_good_rows(object_ids, good)
    return Embeddings(np.asarray(object_ids.take(pa.array(keep)).to_pylist(), dtype=object),
                      np.ascontiguousarray(vectors[keep]), skipped)


# -- The embeddings directory in pieces: what the driver plans from file footers, what tasks read -----------------

ADD_BATCH_BYTES = 64 * 1024 ** 2  # float32 vectors decoded at once by a scan / shard task (one faiss add)
SCAN_PIECE_ROWS = 1_000_000  # rows per scan task at most (its result: one bool per row and the picked rows)


@dataclass(frozen=True)
class EmbeddingFile:
    uri: str
    num_rows: int


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of one Parquet file; ``first_row`` is the position of ``start`` in the whole directory
    (files in name order, rows in file order)."""
    uri: str
    start: int
    stop: int
    first_row: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass
class ShardPlan:
    """One shard: a contiguous run of the directory's rows (as pieces), the rows of it to index (global positions,
    sorted) and their FAISS ids, in the same order."""
    pieces: list[Piece]
    rows: np.ndarray  # int64
    ids: np.ndarray  # int64


def embedding_files(storage, uri: str) -> tuple[list[EmbeddingFile], pa.DataType]:
    """The Parquet files of a complete embeddings directory, in name order, with row counts from their footers,
    and the type of the ``embedding`` column. Reads no column data."""
    import pyarrow.parquet as pq

    if not storage.is_complete(uri):
        raise ArtsimError(f"{uri}: incomplete output (no _SUCCESS marker); re-run the stage that writes it")
    files, emb_type = [], None
    fs, _ = storage.arrow_fs(uri)
    for file_uri in sorted(storage.parquet_files(uri)):
        with fs.open_input_file(storage.arrow_fs(file_uri)[1]) as f:  # footer only
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        for column in ("object_id", "embedding"):
            if column not in schema.names:
                raise ArtsimError(f"embeddings: {file_uri}: missing column {column!r} (found "
                                  f"{', '.join(schema.names)})")
        this_type = schema.field("embedding").type
        check_embedding_type(this_type)
        if emb_type is not None and this_type != emb_type:
            raise ArtsimError(f"embeddings: {file_uri}: column 'embedding' is {this_type}, other files have "
                              f"{emb_type}")
        emb_type = this_type
        files.append(EmbeddingFile(file_uri, int(meta.num_rows)))
    if not files or sum(f.num_rows for f in files) == 0:
        raise ArtsimError(f"embeddings: {uri} is empty; nothing to index")
    return files, emb_type


def read_object_ids(storage, files: list[EmbeddingFile]) -> pa.Array:
    """The ``object_id`` column of every file, in directory order (one string per row; the only column the
    driver reads in full)."""
    import pyarrow.parquet as pq

    parts = []
    for f in files:
        fs, path = storage.arrow_fs(f.uri)
        with fs.open_input_file(path) as handle:
            column = pq.read_table(handle, columns=["object_id"]).column("object_id")
        if len(column) != f.num_rows:
            raise ArtsimError(f"embeddings: {f.uri} has {len(column)} object ids but its footer says {f.num_rows} rows")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ArtsimError(f"embeddings: {f.uri}: column 'object_id' must be strings, got {column.type}")
        parts.extend(c.cast(pa.string()) for c in column.chunks)
    return pa.chunked_array(parts, pa.string()).combine_chunks()


def file_offsets(files: list[EmbeddingFile]) -> np.ndarray:
    """Global position of each file's first row, plus the total at the end."""
    return np.concatenate([[0], np.cumsum([f.num_rows for f in files])]).astype(np.int64)


def pieces_between(files: list[EmbeddingFile], lo: int, hi: int) -> list[Piece]:
    """The pieces covering global rows ``lo:hi`` (one per file touched)."""
    offsets = file_offsets(files)
    out = []
    for i, f in enumerate(files):
        a, b = max(lo, offsets[i]), min(hi, offsets[i + 1])
        if a < b:
            out.append(Piece(f.uri, int(a - offsets[i]), int(b - offsets[i]), int(a)))
    return out


def scan_pieces(files: list[EmbeddingFile], max_rows: int = SCAN_PIECE_ROWS) -> list[Piece]:
    """Every row of the directory exactly once, in order, in pieces of at most ``max_rows`` rows."""
    offsets = file_offsets(files)
    out = []
    for i, f in enumerate(files):
        for start in range(0, f.num_rows, max_rows):
            stop = min(f.num_rows, start + max_rows)
            out.append(Piece(f.uri, start, stop, int(offsets[i] + start)))
    return out


def plan_shards(files: list[EmbeddingFile], rows: np.ndarray, ids: np.ndarray, num_shards: int) -> list[ShardPlan]:
    """Split the rows to index (sorted global positions, with their ids) into ``num_shards`` shards of nearly
    equal size, each a contiguous run of the directory, so that a shard task reads only its own part of the files.

    Deterministic: the same files and rows give the same shards."""
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if len(rows) != len(ids):
        raise ValueError(f"{len(rows)} rows but {len(ids)} ids")
    if len(rows) and np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be sorted and unique")
    num_shards = max(1, min(num_shards, len(rows)))
    bounds = [len(rows) * s // num_shards for s in range(num_shards + 1)]
    plans = []
    for s in range(num_shards):
        r, i = rows[bounds[s]:bounds[s + 1]], ids[bounds[s]:bounds[s + 1]]
        pieces = pieces_between(files, int(r[0]), int(r[-1]) + 1) if len(r) else []
        plans.append(ShardPlan(pieces, r, i))
    return plans


def batch_rows_for(dim: int, batch_bytes: int = ADD_BATCH_BYTES) -> int:
    """Rows per decoded batch: ``batch_bytes`` of float32 vectors, between 1024 and 65536 rows."""
    return int(max(1024, min(65536, batch_bytes // max(1, 4 * dim))))


def iter_piece(storage, piece: Piece, batch_rows: int):
    """Yield (global position of the first row, ``embedding`` column slice) for ``piece``, ``batch_rows`` rows at
    a time; only the row groups overlapping the piece are read, so memory is bounded by a batch."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(piece.uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, buffer_size=1 << 23)  # pages streamed: a huge row group is not read whole
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        groups = [g for g in range(len(sizes)) if bounds[g] < piece.stop and bounds[g + 1] > piece.start]
        if not groups:
            return
        position = int(bounds[groups[0]])
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=["embedding"],
                                     use_threads=False):
            lo, hi = position, position + batch.num_rows
            position = hi
            a, b = max(lo, piece.start), min(hi, piece.stop)
            if a < b:
                yield piece.first_row + (a - piece.start), batch.column(0).slice(a - lo, b - a)
            if hi >= piece.stop:
                break


def max_length_of_piece(storage, piece: Piece, batch_rows: int = 65536) -> int:
    """Longest vector in a piece of variable-length lists (their dimension is the longest; shorter rows are bad)."""
    return max((max_list_length(col) for _, col in iter_piece(storage, piece, batch_rows)), default=0)


@dataclass
class ScanResult:
    num_rows: int
    good: np.ndarray  # bool per row of the piece: a vector that can be indexed (object ids are checked apart)
    off_norm: int  # good vectors that were not unit length (normalised wherever they are read)
    picked: list  # one float32 (rows, dim) array per list of rows asked for, normalised; bad rows are zeros/garbage


def scan_piece(storage, piece: Piece, dim: int, picks: list[np.ndarray], batch_rows: int) -> ScanResult:
    """Read a piece once: which rows hold a good vector, and the vectors at the global rows in each of ``picks``
    (sorted arrays: e.g. tuning-query candidates, training candidates), so no other pass is needed for them."""
    good = np.zeros(piece.num_rows, dtype=bool)
    picked = [np.zeros((len(p), dim), dtype=np.float32) for p in picks]
    off_norm = 0
    for first, column in iter_piece(storage, piece, batch_rows):
        vectors, batch_good, batch_off = vector_batch(column, dim)
        good[first - piece.first_row:first - piece.first_row + len(vectors)] = batch_good
        off_norm += batch_off
        for want, out in zip(picks, picked):
            lo, hi = np.searchsorted(want, [first, first + len(vectors)])
            out[lo:hi] = vectors[want[lo:hi] - first]
    return ScanResult(piece.num_rows, good, off_norm, picked)


def read_shard_vectors(storage, plan: ShardPlan, dim: int, batch_rows: int):
    """Yield (vectors, ids) of a shard's rows, at most ``batch_rows`` rows read at a time. Every row planned must
    still hold a good vector: the files changing between the scan and the shard tasks is an error, never a
    silently different index."""
    done = 0
    for piece in plan.pieces:
        for first, column in iter_piece(storage, piece, batch_rows):
            vectors, good, _ = vector_batch(column, dim)
            lo, hi = np.searchsorted(plan.rows, [first, first + len(vectors)])
            if hi == lo:
                continue
            local = plan.rows[lo:hi] - first
            if not good[local].all():
                raise ArtsimError(f"embeddings: {piece.uri} changed while the index was built (a row that was "
                                  "valid is not any more); run the index stage again")
            done += hi - lo
            yield vectors[local], plan.ids[lo:hi]
    if done != len(plan.rows):
        raise ArtsimError(f"embeddings changed while the index was built: a shard found {done} of its "
                          f"{len(plan.rows)} rows; run the index stage again")


def assign_ids(object_ids, previous: Optional[pa.Table], previous_next_id: int = 0
               ) -> tuple[np.ndarray, int, int]:
    """FAISS ids for ``object_ids`` (unique; a numpy/Python sequence or a pyarrow string array): an object indexed
    before keeps its id; new objects get ids above every id ever handed out (``previous_next_id``), in the order
    given, so a retired id is never reused for another work.

    Returns (ids, next_id, reused_count). Vectorised (a hash lookup in Arrow), so tens of millions of ids are cheap."""
    if isinstance(object_ids, pa.ChunkedArray):
        object_ids = object_ids.combine_chunks()
    elif not isinstance(object_ids, pa.Array):
        object_ids = pa.array(list(object_ids), pa.string())
    next_id = int(previous_next_id)
    position = np.full(len(object_ids), -1, dtype=np.int64)
    old_ids = np.zeros(0, dtype=np.int64)
    if previous is not None and previous.num_rows:
        old_ids = previous.column("id").to_numpy().astype(np.int64)
        next_id = max(next_id, int(old_ids.max()) + 1)
        found = pc.index_in(object_ids, value_set=previous.column("object_id").combine_chunks())
        position = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    new = position < 0
    ids = np.empty(len(object_ids), dtype=np.int64)
    ids[~new] = old_ids[position[~new]]
    ids[new] = next_id + np.arange(int(new.sum()), dtype=np.int64)
    return ids, next_id + int(new.sum()), int((~new).sum())


def _wanted_columns(facets: list[str], metadata: list[str]) -> list[str]:
    return [c for c in dict.fromkeys(list(facets) + list(metadata)) if c not in ("id", "object_id", "shard")]


def check_record_columns(storage, records_uri: str, facets: list[str], metadata: list[str]) -> list[str]:
    """The facet / metadata columns to read from records/ (a clear ConfigError for one it lacks); schema only."""
    import pyarrow.dataset as ds

    fs, path = storage.arrow_fs(records_uri)
    names = ds.dataset(path, filesystem=fs, format="parquet").schema.names
    wanted = _wanted_columns(facets, metadata)
    for c in wanted:
        if c not in names:
            key = "index.facets" if c in facets else "index.metadata"
            raise ConfigError(key, f"column {c!r} is not in records/ (it has {', '.join(names)})")
    return wanted


def read_record_columns(storage, records_uri: str, facets: list[str], metadata: list[str]) -> pa.Table:
    """object_id and the facet / metadata columns of records/, nothing else: at aggregator scale the descriptions,
    subjects and URLs the index does not keep would dominate the memory of the plan task that joins them."""
    wanted = check_record_columns(storage, records_uri, facets, metadata)
    return storage.read_table(records_uri, columns=["object_id"] + wanted)


def id_table(ids: np.ndarray, object_ids: np.ndarray, shard_of: np.ndarray, records: Optional[pa.Table],
             facets: list[str], metadata: list[str]) -> pa.Table:
    """ids.parquet: id, object_id, shard, facet columns, metadata columns; sorted by id.

    Facets and metadata come from records/ (left join on object_id; a work without a record gets nulls, and its
    collection from its object_id prefix)."""
    if not isinstance(object_ids, (pa.Array, pa.ChunkedArray)):
        object_ids = pa.array(list(object_ids), pa.string())
    table = pa.table({"id": pa.array(ids, pa.int64()), "object_id": object_ids,
                      "shard": pa.array(shard_of, pa.int32())})
    wanted = _wanted_columns(facets, metadata)
    if records is not None:
        for c in wanted:
            if c not in records.column_names:
                key = "index.facets" if c in facets else "index.metadata"
                raise ConfigError(key, f"column {c!r} is not in records/ (it has {', '.join(records.column_names)})")
        # index_in gives the position of the first equal value: a repeated record, the first one wins.
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
        collections = collections_of(table.column("object_id"), table.column("collection"))
        table = table.set_column(table.column_names.index("collection"), "collection", collections)
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


def build_shard(trained: np.ndarray, batches, out_dir: str, queries: Optional[np.ndarray] = None,
                k_truth: int = 10) -> ShardResult:
    """Add one shard's vectors, arriving as (vectors, ids) batches, to a copy of the trained index and write it to
    ``out_dir``. Memory: the index plus one batch.

    Also computes the exact top-k of ``queries`` over this shard's vectors, batch by batch: merged across shards,
    that is the ground truth for tuning, computed where the vectors already are."""
    start = time.perf_counter()
    index = faiss.deserialize_index(trained)
    truth = None
    for vectors, ids in batches:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(vectors):
            continue
        index.add_with_ids(vectors, ids)
        if queries is not None and len(queries):
            part = exact_topk(queries, vectors, ids, k_truth)
            truth = part if truth is None else merge_topk([truth, part], k_truth)
    if truth is None and queries is not None and len(queries):
        truth = exact_topk(queries, np.zeros((0, index.d), np.float32), np.zeros(0, np.int64), k_truth)
    add_seconds = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".faiss", dir=out_dir)
    os.close(fd)
    faiss.write_index(index, path)
    truth_scores, truth_ids = truth if truth is not None else (None, None)
    return ShardResult(path, int(index.ntotal), sha256_file(path), os.path.getsize(path), add_seconds,
                       truth_scores, truth_ids)
