"""What the report stage reads from a run directory, in bounded memory whatever the run's size.

Counts (records per collection, embedded works) are computed by streaming one or two columns; a deterministic
sample of at most ``report.max_works`` works, stratified per collection, is chosen from the embeddings' object ids
(`plan_sample`) and only those works' vectors and records are kept while the files are streamed; the neighbour
sheets are the strongest rank-1 links of the whole links table (a bounded top-N over a streamed scan,
`strongest_links`) with only their rows read; thumbnails only for the works shown. artsim/report/stage.py renders.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.config import ConfigError
from artsim.errors import ArtsimError

_THUMB = 96  # px, longest side of embedded thumbnails
_SAMPLE_SEED = 0  # part of the sample hash: the same run directory always gives the same sample
_VECTOR_BATCH_ROWS = 4_096  # rows per streamed batch of embeddings (a 2048-d float32 batch is 32 MiB)
_RECORD_COLUMNS = ["object_id", "collection", "title", "creator", "date", "culture", "object_type", "landing_url",
                   "medium", "description", "subjects", "concepts"]  # shown, or used by the curator sections


def read_json_or_none(storage, uri):
    return storage.read_json(uri) if storage.exists(uri) else None


@dataclass
class Sample:
    """Which embedding rows the report reads: ``rows`` (sorted global row numbers over ``files`` in order), out of
    ``total`` rows; ``by_collection`` counts every row per object_id prefix (the whole run)."""
    files: list = field(default_factory=list)  # [(file uri, rows)] in name order
    dim: Optional[int] = None
    total: int = 0
    rows: Optional[np.ndarray] = None  # None: no embeddings to read
    is_sample: bool = False
    by_collection: dict = field(default_factory=dict)


def report_sample(ctx, max_works: int) -> tuple[Optional[str], Sample]:
    """The embeddings the index stage uses (same rule: index.embeddings, else embed's model key, else the only
    complete directory) and the rows of them the report reads; nothing when the run has none yet."""
    from artsim.rundir.embeddings import check_embedding_type, fixed_dim
    from artsim.rundir.names import embeddings_key

    try:
        key = embeddings_key(ctx, ctx.config.index.embeddings)
    except ConfigError:  # no embeddings in this run (yet): the report shows what there is
        return None, Sample()
    uri = ctx.paths.embeddings(key)
    if not ctx.storage.is_complete(uri):  # index.embeddings names a directory that is not written (yet)
        return None, Sample()
    files, dim = [], None
    for file_uri in ctx.storage.dataset_files(uri):
        meta, schema = _footer(ctx.storage, file_uri)
        for column in ("object_id", "embedding"):
            if column not in schema.names:
                raise ArtsimError(f"embeddings: {file_uri}: missing column {column!r}")
        check_embedding_type(schema.field("embedding").type)
        dim = dim or fixed_dim(schema.field("embedding").type)
        files.append((file_uri, int(meta.num_rows)))
    sample = plan_sample(ctx.storage, files, max_works)
    sample.dim = dim
    return uri, sample


def plan_sample(storage, files: list, max_works: int, seed: int = _SAMPLE_SEED) -> Sample:
    """Choose at most ``max_works`` rows of the embedding files, reading only their object_id column: the run
    directory's one stable per-collection sample (``artsim.rundir.sample.sample_rows``; the collection is the
    object_id prefix, as embeddings carry no collection column)."""
    from artsim.rundir.sample import sample_rows

    chosen = sample_rows(storage, [uri for uri, _ in files], max_works, seed)
    return Sample(files, None, sum(n for _, n in files), chosen.rows, chosen.sampled, chosen.counts)


def read_sample_vectors(storage, sample: Sample) -> tuple[list[str], Optional[np.ndarray]]:
    """The sample's (object ids, float32 L2-normalised vectors) in file order, streaming the files and keeping
    only the wanted rows; row groups without a wanted row are not read. A row with a bad vector (null, NaN, zero,
    wrong length) or a repeated object id is left out (the first good row of an id wins, as in the index stage)."""
    import pyarrow.parquet as pq

    from artsim.rundir.embeddings import max_list_length, vector_batch

    wanted, dim = sample.rows, sample.dim
    ids_out: list[str] = []
    vectors_out: list[np.ndarray] = []
    seen: set[str] = set()
    position = 0
    for file_uri, n_rows in sample.files:
        lo, hi = np.searchsorted(wanted, [position, position + n_rows])
        local = wanted[lo:hi] - position
        position += n_rows
        if not len(local):
            continue
        fs, path = storage.arrow_fs(file_uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle, buffer_size=1 << 20)  # buffered: a huge row group is read in pieces
            group_start = 0
            for g in range(parquet.metadata.num_row_groups):
                group_rows = parquet.metadata.row_group(g).num_rows
                a, b = np.searchsorted(local, [group_start, group_start + group_rows])
                in_group = local[a:b] - group_start
                group_start += group_rows
                if not len(in_group):
                    continue
                batch_start = 0
                for batch in parquet.iter_batches(batch_size=_VECTOR_BATCH_ROWS, row_groups=[g],
                                                  columns=["object_id", "embedding"]):
                    c, d = np.searchsorted(in_group, [batch_start, batch_start + batch.num_rows])
                    take = pa.array(in_group[c:d] - batch_start)
                    batch_start += batch.num_rows
                    if not len(take):
                        continue
                    picked = batch.take(take)
                    emb = picked.column(1)
                    dim = dim or max_list_length(emb)
                    if not dim:
                        continue
                    vectors, good, _ = vector_batch(emb, dim)
                    for r, object_id in enumerate(picked.column(0).to_pylist()):
                        if good[r] and object_id and object_id not in seen:
                            seen.add(object_id)
                            ids_out.append(object_id)
                            vectors_out.append(vectors[r])
    if not ids_out:
        return [], None
    return ids_out, np.stack(vectors_out).astype(np.float32, copy=False)


def report_links_uri(ctx) -> Optional[str]:
    """The links the links stage writes for this config (links.name, else index.name, else the embeddings key)."""
    from artsim.rundir.names import links_name

    try:
        uri = ctx.paths.links(links_name(ctx))
    except ConfigError:
        return None
    return uri if ctx.storage.is_complete(uri) else None


def strongest_links(storage, links_uri: str, n: int) -> list[str]:
    """Objects whose best cross-collection link (rank 1) is strongest, strongest first (ties: table order), over
    the whole links table — streamed (object_id, rank, score only) with a running top-n, so memory is O(n)."""
    best_scores = np.zeros(0, np.float64)
    best_rows = np.zeros(0, np.int64)
    best_ids = np.zeros(0, object)
    position = 0
    for file_uri in storage.dataset_files(links_uri):
        for batch in storage.iter_batches(file_uri, ["object_id", "rank", "score"]):
            top = np.flatnonzero(pc.fill_null(pc.equal(batch.column("rank"), 1), False).to_numpy(
                zero_copy_only=False))
            if len(top):
                scores = batch.column("score").take(pa.array(top)).to_numpy(zero_copy_only=False).astype(np.float64)
                keep = np.lexsort((top, np.nan_to_num(-scores, nan=np.inf)))[:n]  # NaN scores last
                ids = np.array(batch.column("object_id").take(pa.array(top[keep])).to_pylist(), dtype=object)
                best_scores = np.concatenate([best_scores, scores[keep]])
                best_rows = np.concatenate([best_rows, position + top[keep]])
                best_ids = np.concatenate([best_ids, ids])
                order = np.lexsort((best_rows, np.nan_to_num(-best_scores, nan=np.inf)))[:n]
                best_scores, best_rows, best_ids = best_scores[order], best_rows[order], best_ids[order]
            position += batch.num_rows
    return best_ids.tolist()


def filtered_rows(storage, uri: str, object_ids: set, columns: Optional[list[str]] = None) -> pa.Table:
    """The rows of a dataset directory whose object_id is in ``object_ids`` (streamed: memory is one batch plus
    the rows kept)."""
    return _select(storage, uri, object_ids, columns)[0]


@dataclass
class RecordsRead:
    rows: pa.Table  # the records of the wanted works (columns of _RECORD_COLUMNS that exist)
    total: int  # records in the run
    by_collection: dict  # collection -> records (whole run)


def count_and_select_records(storage, records_uri: str, object_ids: set) -> RecordsRead:
    """One streamed pass over records/: counts per collection for the whole run, and the wanted works' rows."""
    rows, counts = _select(storage, records_uri, object_ids, _RECORD_COLUMNS, count_column="collection")
    return RecordsRead(rows, sum(counts.values()), counts)


def _select(storage, uri, object_ids, columns, count_column=None) -> tuple[pa.Table, dict]:
    value_set = pa.array(sorted(object_ids), pa.string())
    kept, counts, schema = [], {}, None
    for file_uri in storage.dataset_files(uri):
        for batch in storage.iter_batches(file_uri, columns):
            schema = schema or batch.schema
            if count_column is not None:
                for item in pc.value_counts(batch.column(count_column)).to_pylist():
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
            if len(value_set):
                mask = pc.is_in(batch.column("object_id"), value_set=value_set)
                if pc.any(mask).as_py():
                    kept.append(pa.Table.from_batches([batch.filter(mask)]))
    if kept:
        table = pa.concat_tables(kept, promote_options="default")
    else:
        table = (schema or pa.schema([("object_id", pa.string())])).empty_table()
    return table, counts


def _footer(storage, file_uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(file_uri)
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
        return meta, meta.schema.to_arrow_schema()


def thumbnails(storage, images_uri: str, wanted: set[str]) -> dict[str, str]:
    """object_id -> data URI of a small JPEG, for the wanted ids (streamed in small batches: images are large)."""
    from PIL import Image

    out: dict[str, str] = {}
    if not wanted:
        return out
    value_set = pa.array(sorted(wanted), pa.string())
    for part in storage.parquet_files(images_uri):
        for batch in storage.iter_batches(part, ["object_id", "status", "image"], batch_rows=256):
            mask = pc.and_(pc.equal(batch.column("status"), "ok"),
                           pc.is_in(batch.column("object_id"), value_set=value_set))
            for row in batch.filter(pc.fill_null(mask, False)).to_pylist():
                try:
                    im = Image.open(io.BytesIO(row["image"]))
                    im.draft("RGB", (_THUMB, _THUMB))
                    im = im.convert("RGB")
                    im.thumbnail((_THUMB, _THUMB))
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=80)
                    out[row["object_id"]] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
                except Exception:  # a bad stored image only loses its thumbnail
                    continue
    return out


def read_vectors_for_ids(storage, embeddings_uri: str, object_ids: set) -> dict[str, np.ndarray]:
    """object_id -> float32 L2-normalised vector for the given works (streamed over the embeddings; the first good
    row of an id wins, as in read_sample_vectors). Works without a usable vector are absent."""
    from artsim.rundir.embeddings import max_list_length, vector_batch

    out: dict[str, np.ndarray] = {}
    if not object_ids:
        return out
    value_set = pa.array(sorted(object_ids), pa.string())
    for file_uri in storage.dataset_files(embeddings_uri):
        for batch in storage.iter_batches(file_uri, ["object_id", "embedding"], _VECTOR_BATCH_ROWS):
            mask = pc.fill_null(pc.is_in(batch.column("object_id"), value_set=value_set), False)
            if not pc.any(mask).as_py():
                continue
            picked = batch.filter(mask)
            dim = max_list_length(picked.column(1))
            if not dim:
                continue
            vectors, good, _ = vector_batch(picked.column(1), dim)
            for r, object_id in enumerate(picked.column(0).to_pylist()):
                if good[r] and object_id not in out:
                    out[object_id] = vectors[r].astype(np.float32)
    return out
