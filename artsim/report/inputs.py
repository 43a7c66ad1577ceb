"""What the report stage reads from a run directory, in bounded memory whatever the run's size.

Counts (records per collection, embedded works) are computed by streaming one or two columns; a deterministic
sample of at most ``report.max_works`` works, stratified per collection, is chosen from the embeddings' object ids
(`plan_sample`) and only those works' vectors and records are kept while the files are streamed; the neighbour
sheets are the strongest rank-1 links of the whole links table (a bounded top-N over a streamed scan,
`strongest_links`) with only their rows read; thumbnails only for the works shown. artsim/report.py renders.
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
    from artsim.index.stage import embeddings_key
    from artsim.index.build import check_embedding_type, fixed_dim

    try:
        key = embeddings_key(ctx)
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
    """Choose at most ``max_works`` rows of the embedding files, reading only their object_id column.

    Below ``max_works`` rows: every row. Above: per collection (the object_id prefix, ``<collection>:<id>``), the
    rows with the smallest ``stable_hash(object_id, seed)`` — a uniform random sample that is the same for the same
    run, however the files are split. How many per collection: ``allocate``. Memory: at most 2 x ``max_works``
    (hash, row) pairs per collection, whatever the run's size.
    """
    total = sum(n for _, n in files)
    pools: dict[str, _Pool] = {}
    position = 0
    for file_uri, _ in files:
        for batch in storage.iter_batches(file_uri, ["object_id"]):
            ids = batch.column(0)
            rows = position + np.arange(len(ids), dtype=np.int64)
            position += len(ids)
            valid = pc.is_valid(ids).to_numpy(zero_copy_only=False)
            if not valid.all():  # a row without an id is never shown
                ids, rows = ids.filter(pa.array(valid)), rows[valid]
            hashes = stable_hash(ids, seed)
            collections = id_collections(ids).dictionary_encode()
            codes = collections.indices.to_numpy(zero_copy_only=False)
            for code, name in enumerate(collections.dictionary.to_pylist()):
                mine = codes == code
                pools.setdefault(name, _Pool()).add(hashes[mine], rows[mine], keep=max_works)
    by_collection = {name: pool.count for name, pool in pools.items()}
    if total <= max_works:
        return Sample(files, None, total, np.arange(total, dtype=np.int64), False, by_collection)
    quotas = allocate(by_collection, max_works)
    chosen = [pools[name].smallest(q) for name, q in quotas.items() if q > 0]
    rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return Sample(files, None, total, rows, True, by_collection)


class _Pool:
    """The rows of one collection with the smallest hashes seen so far (bounded), and how many rows it has."""

    def __init__(self):
        self.hashes = np.zeros(0, np.uint64)
        self.rows = np.zeros(0, np.int64)
        self.count = 0

    def add(self, hashes: np.ndarray, rows: np.ndarray, keep: int) -> None:
        self.count += len(rows)
        self.hashes = np.concatenate([self.hashes, hashes])
        self.rows = np.concatenate([self.rows, rows])
        if len(self.rows) > 2 * keep:  # trim now and then, not every batch: amortised O(rows)
            order = np.lexsort((self.rows, self.hashes))[:keep]
            self.hashes, self.rows = self.hashes[order], self.rows[order]

    def smallest(self, n: int) -> np.ndarray:
        return self.rows[np.lexsort((self.rows, self.hashes))[:n]]


def allocate(counts: dict, budget: int) -> dict:
    """How many works of each collection go into a sample of ``budget`` (everything when the total fits).

    Every collection first gets up to budget / (2 x collections) works (so a small museum is not drowned by a big
    one: with budget >= 2 x collections, every collection appears), the rest of the budget is shared in proportion
    to what each has left (largest remainder, ties by name). Never more than a collection has; sums to ``budget``.
    """
    total = sum(counts.values())
    if total <= budget:
        return dict(counts)
    floor = budget // (2 * len(counts))
    base = {c: min(n, floor) for c, n in counts.items()}
    left = budget - sum(base.values())
    rest = {c: counts[c] - base[c] for c in counts}
    rest_total = sum(rest.values())  # > left, since total > budget
    share = {c: left * rest[c] // rest_total for c in counts}
    remainder = {c: left * rest[c] % rest_total for c in counts}
    for c in sorted(counts, key=lambda c: (-remainder[c], str(c)))[:left - sum(share.values())]:
        share[c] += 1
    return {c: base[c] + share[c] for c in counts}


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def stable_hash(ids, seed: int = 0) -> np.ndarray:
    """uint64 per string: FNV-1a over its UTF-8 bytes, then a splitmix64 finaliser that mixes in ``seed``.

    Vectorised over the Arrow buffers (tens of millions of ids in seconds, no Python string per row); the same
    string gives the same value in any batch, process or machine (unlike Python's ``hash``). Nulls hash as "".
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        ids = ids.cast(pa.string())
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.uint64)
    offset_type = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    buffers = ids.buffers()
    offsets = np.frombuffer(buffers[1], offset_type, count=n + 1,
                            offset=ids.offset * np.dtype(offset_type).itemsize).astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    if ids.null_count:
        lengths[~pc.is_valid(ids).to_numpy(zero_copy_only=False)] = 0
    longest_first = np.argsort(-lengths, kind="stable")
    still = np.searchsorted(-lengths[longest_first], -np.arange(int(lengths.max(initial=0))), side="left")
    h = np.full(n, _FNV_OFFSET, np.uint64)
    for j, m in enumerate(still):  # byte j of every string longer than j
        rows = longest_first[:m]
        h[rows] = (h[rows] ^ data[starts[rows] + j].astype(np.uint64)) * _FNV_PRIME
    z = h ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64) ^ lengths.astype(np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def id_collections(ids) -> pa.Array:
    """The collection part of each ``<collection>:<local id>`` object id ("" when there is no colon)."""
    return pc.if_else(pc.match_substring(ids, ":"), pc.list_element(pc.split_pattern(ids, ":", max_splits=1), 0),
                      pa.scalar("", pa.string()))


def read_sample_vectors(storage, sample: Sample) -> tuple[list[str], Optional[np.ndarray]]:
    """The sample's (object ids, float32 L2-normalised vectors) in file order, streaming the files and keeping
    only the wanted rows; row groups without a wanted row are not read. A row with a bad vector (null, NaN, zero,
    wrong length) or a repeated object id is left out (the first good row of an id wins, as in the index stage)."""
    import pyarrow.parquet as pq

    from artsim.index.build import max_list_length, vector_batch

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
    from artsim.links.stage import links_name

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
