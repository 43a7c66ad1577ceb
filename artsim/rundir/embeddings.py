"""embeddings/<model_key>/: its schema, the one rule for which rows are usable, a streaming reader and a writer.

A row is usable when it has a non-empty ``object_id`` and a vector of the directory's dimension whose values are all
finite and not all zero; vectors that are not unit length are normalised (float16 storage moves norms by ~1e-3);
of several rows with one ``object_id`` the first is used. The index stage (in Ray tasks, a piece at a time), mine,
train and the report all apply this rule through ``vector_batch`` and ``first_good_rows`` / ``iter_embedding_batches``.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from artsim.errors import ArtsimError
from artsim.storage import Storage, join

log = logging.getLogger("artsim")
NORM_TOLERANCE = 1e-2  # embeddings are stored L2-normalised; float16 storage moves norms by ~1e-3
ROW_GROUP_ROWS = 2048
MAX_REPORTED_FAILURES = 1000


def check_embedding_type(dtype: pa.DataType) -> None:
    if not (pa.types.is_fixed_size_list(dtype) or pa.types.is_list(dtype) or pa.types.is_large_list(dtype)):
        raise ArtsimError(f"embeddings: column 'embedding' must be a list of floats, got {dtype}")


def fixed_dim(dtype: pa.DataType) -> Optional[int]:
    """The dimension a fixed-size list type declares; None for variable-length lists (found by reading them)."""
    return dtype.list_size if pa.types.is_fixed_size_list(dtype) else None


def max_list_length(emb: pa.Array) -> int:
    lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
    lengths = lengths[np.isfinite(lengths)] if lengths.dtype.kind == "f" else lengths  # nulls read as NaN
    return int(lengths.max()) if len(lengths) else 0


def vector_batch(emb: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One batch of the ``embedding`` column as (float32 vectors (rows, dim), good mask, number normalised here).

    A row is good when it is a non-null list of ``dim`` non-null finite values, not all zero. Good rows that are
    not unit length are normalised in place (so inner product stays cosine similarity); bad rows are left as zeros
    or garbage and must not be used."""
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    check_embedding_type(emb.type)
    n = len(emb)
    values = None
    if emb.null_count == 0:
        if pa.types.is_fixed_size_list(emb.type):
            values = emb.flatten() if emb.type.list_size == dim else None
        else:
            lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
            values = emb.flatten() if np.all(lengths == dim) else None
    if values is not None:  # null values inside a list read as NaN: non-finite, so the row is bad
        vectors = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
        valid_shape = np.ones(n, dtype=bool)
    else:  # nulls or ragged rows: go row by row and mark the bad ones
        vectors = np.zeros((n, dim), dtype=np.float32)
        valid_shape = np.zeros(n, dtype=bool)
        for i, row in enumerate(emb.to_pylist()):
            if row is not None and len(row) == dim and all(v is not None for v in row):
                vectors[i] = row
                valid_shape[i] = True
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(vectors, axis=1)
        finite = np.isfinite(vectors).all(axis=1)
    good = valid_shape & finite & (norms > 0)
    off_norm = good & (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if off_norm.any():
        if not vectors.flags.writeable:
            vectors = vectors.copy()
        vectors[off_norm] /= norms[off_norm, None]
    return vectors, good, int(off_norm.sum())


def first_good_rows(object_ids: pa.Array, good_vectors: np.ndarray) -> tuple[np.ndarray, dict]:
    """Rows to index: a good vector and a non-empty object_id, and the first such row of each object_id.

    Returns (sorted row positions as int64, skipped counts by reason). Runs on the object_id column and one bool
    per row, never on the vectors, so the index stage's driver can call it at any scale."""
    if isinstance(object_ids, pa.ChunkedArray):
        object_ids = object_ids.combine_chunks()
    has_id = pc.fill_null(pc.greater(pc.utf8_length(object_ids), 0), False).to_numpy(zero_copy_only=False)
    good = np.asarray(good_vectors, dtype=bool) & has_id
    skipped: dict[str, int] = {}
    _count(skipped, "bad_vector_or_id", int(len(good) - good.sum()))
    rows = np.nonzero(good)[0].astype(np.int64)
    if len(rows):
        grouped = pa.table({"object_id": object_ids.take(pa.array(rows)), "row": rows}).group_by(
            "object_id", use_threads=False).aggregate([("row", "min")])
        keep = np.sort(grouped.column("row_min").to_numpy())
    else:
        keep = rows
    _count(skipped, "duplicate_object_id", len(rows) - len(keep))
    return keep, skipped


def _count(d: dict, key: str, n: int) -> None:
    if n:
        d[key] = d.get(key, 0) + n


def embeddings_schema(dim: int, dtype: str) -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([("object_id", pa.string()), ("embedding", pa.list_(value_type, dim)), ("model", pa.string())])




def iter_embedding_batches(storage, uri: str, keep: Optional[Iterable[str]] = None, batch_rows: int = 65_536
                           ) -> Iterator[tuple[list, np.ndarray]]:
    """embeddings/<key>/ streamed: (object_ids, float32 (rows, d) rows of exactly unit length) per batch, only
    usable rows (the rule above; a repeated object_id keeps its first row), only the ``keep`` ids when given. Memory: one batch plus the
    ids seen so far (for the repeated-id rule)."""
    wanted = None if keep is None else pa.array(sorted(set(keep)), pa.string())
    dim = None
    seen: set = set()
    skipped = 0
    for file_uri in storage.dataset_files(uri):
        for batch in storage.iter_batches(file_uri, ["object_id", "embedding"], batch_rows):
            if wanted is not None:
                batch = batch.filter(pc.fill_null(pc.is_in(batch.column(0), value_set=wanted), False))
            if not batch.num_rows:
                continue
            emb = batch.column(1)
            check_embedding_type(emb.type)
            dim = dim or fixed_dim(emb.type) or max_list_length(emb)
            vectors, good, _ = vector_batch(emb, dim)
            ids = batch.column(0).to_pylist()
            rows = []
            for i in np.flatnonzero(good):
                oid = ids[i]
                if oid and oid not in seen:
                    seen.add(oid)
                    rows.append(i)
            skipped += batch.num_rows - len(rows)
            if rows:
                matrix = vectors[rows]
                # exactly unit length (float16 storage moves norms by ~1e-3): training and mining compare cosines
                matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
                yield [ids[i] for i in rows], np.ascontiguousarray(matrix)
    if skipped:
        log.warning("%s: %d rows skipped (bad vector, no object_id, or a repeated object_id)", uri, skipped)


def load_embedding_matrix(storage, uri: str, keep: Optional[Iterable[str]] = None) -> tuple[list[str], np.ndarray]:
    """embeddings/<key>/ -> (object_ids, float32 (N, d) unit rows), usable rows only.

    ``keep`` (a collection of object ids, e.g. the mining pool or the objects triplets name): only those rows, read
    in streamed batches, so the driver never holds the embeddings of a whole aggregator.
    """
    ids, parts = [], []
    for batch_ids, matrix in iter_embedding_batches(storage, uri, keep):
        ids.extend(batch_ids)
        parts.append(matrix)
    if not ids:
        return [], np.zeros((0, 0), np.float32)
    return ids, np.concatenate(parts)


def embeddings_table(object_ids: list, vectors: np.ndarray, model_name: str, dim: int, dtype: str) -> pa.Table:
    """Rows of an embeddings/<key>/ file (the schema above) from ids and an (N, dim) array."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16" else np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ArtsimError(f"embedding batch has shape {vectors.shape}, expected (N, {dim})")
    return pa.Table.from_arrays([
        pa.array([str(o) for o in object_ids], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        pa.array([model_name] * len(vectors), pa.string()),
    ], schema=embeddings_schema(dim, dtype))


def part_name(source_stem: str, object_ids: list) -> str:
    """The file name of a part written from the rows of one images/ file: ``part-<that file's stem>-<digest of
    the ids>.parquet``. A re-run embeds other ids (those without a vector), so it never writes a name again; a
    retried task writes the same name with the same rows."""
    import hashlib

    digest = hashlib.sha256("\n".join(str(o) for o in object_ids).encode("utf-8")).hexdigest()[:16]
    return f"part-{source_stem}-{digest}.parquet"


def source_of_part(name: str) -> Optional[str]:
    """The images/ file stem a ``part_name`` was written from; None for other names (e.g. an older layout)."""
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    stem, _, digest = name[len("part-"):-len(".parquet")].rpartition("-")
    return stem if stem and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest) else None


def write_embedding_part(storage: Storage, dir_uri: str, source_stem: str, object_ids: list, vectors: np.ndarray,
                         model_name: str, dim: int, dtype: str) -> str:
    """One part file, written atomically (temporary + rename locally, one PUT on S3). Returns its name."""
    name = part_name(source_stem, object_ids)
    storage.write_parquet_file(embeddings_table(object_ids, vectors, model_name, dim, dtype), join(dir_uri, name))
    return name


class EmbeddingWriter:
    """Streams embedding batches into Parquet files under a (staging) directory URI, with exact counts.

    Rows whose ``error`` is set are not written; they are counted and listed in ``_report.json``.
    """

    def __init__(self, storage: Storage, dir_uri: str, model_name: str, dim: int, dtype: str,
                 rows_per_file: int = 50_000):
        self.storage, self.dir_uri, self.model_name = storage, dir_uri, model_name
        self.dim, self.dtype, self.rows_per_file = dim, dtype, rows_per_file
        self.schema = embeddings_schema(dim, dtype)
        self.np_dtype = np.float16 if dtype == "float16" else np.float32
        self.written = 0
        self.failed = 0
        self.failures: list[dict] = []
        self.files: list[str] = []
        self._writer: Optional[pq.ParquetWriter] = None
        self._sink = None
        self._rows_in_file = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, object_ids, embeddings: np.ndarray, errors) -> None:
        errors = ["" if e is None else str(e) for e in errors]
        ok = np.asarray([not e for e in errors], dtype=bool)
        for oid, err in zip(object_ids, errors):
            if err:
                self.failed += 1
                if len(self.failures) < MAX_REPORTED_FAILURES:
                    self.failures.append({"object_id": str(oid), "error": err})
        if not ok.any():
            return
        ids = [str(o) for o, good in zip(object_ids, ok) if good]
        table = embeddings_table(ids, embeddings[ok], self.model_name, self.dim, self.dtype)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        while self._pending_rows:
            if self._writer is None:
                self._open()
            room = self.rows_per_file - self._rows_in_file
            table = pa.concat_tables(self._pending).combine_chunks()
            head, rest = table.slice(0, room), table.slice(room)
            self._writer.write_table(head, row_group_size=ROW_GROUP_ROWS)
            self._rows_in_file += head.num_rows
            self.written += head.num_rows
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows
            if self._rows_in_file >= self.rows_per_file:
                self._close_file()

    def _open(self) -> None:
        uri = join(self.dir_uri, f"part-{len(self.files):05d}.parquet")
        fs, path = self.storage.arrow_fs(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(path), recursive=True)
        self._sink = fs.open_output_stream(path)  # on S3 a multipart upload: the object appears on close only
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd")
        self.files.append(uri)
        self._rows_in_file = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def close(self) -> None:
        self._flush()
        self._close_file()
        if not self.files:  # no ok image: still a valid (empty) dataset with the right schema
            self._open()
            self._writer.write_table(self.schema.empty_table())
            self._close_file()
