"""The `report` stage: one offline HTML page per run (reports/<name>/index.html) for curators and engineers.

It reads what the other stages wrote (records/, images/, embeddings/, links/) and shows: counts per stage, download
outcomes, a 2-D map of the collection (PCA of the embeddings; thumbnails placed at their coordinates), clusters
(k-means) with their members, and neighbour sheets (a work and its nearest works in other collections). Everything
is embedded (thumbnails as data URIs, plots as PNG), so the page opens offline and can be mailed around.

Runs of any size: the driver never holds a whole input. Counts (records per collection, embedded works) are
computed by streaming one or two columns; the map, clusters, suggested tags, vocabulary and latent walks use a
deterministic sample of at most ``report.max_works`` works, stratified per collection (``sample_rows``), and only
those works' vectors and records are kept while the files are streamed; the neighbour sheets are the strongest
rank-1 links of the whole links table (a bounded top-N over a streamed scan) with only their rows read.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.config import ConfigError
from artsim.console import say
from artsim.curate.html import card as _card
from artsim.errors import ArtsimError
from artsim.storage import join

_MAX_MAP_POINTS = 600  # thumbnails on the map
_MAX_SHEETS = 12  # neighbour sheets
_MAX_CLUSTER_MEMBERS = 10
_MAX_VOCABULARY_ROWS = 24  # works listed in the vocabulary section (only these are text-encoded)
_THUMB = 96  # px, longest side of embedded thumbnails
_SAMPLE_SEED = 0  # part of the sample hash: the same run directory always gives the same sample
_BATCH_ROWS = 65_536  # rows per streamed batch of ids / records / links
_VECTOR_BATCH_ROWS = 4_096  # rows per streamed batch of embeddings (a 2048-d float32 batch is 32 MiB)
_RECORD_COLUMNS = ["object_id", "collection", "title", "creator", "date", "culture", "object_type", "landing_url",
                   "medium", "description", "subjects", "concepts"]  # shown, or used by the curator sections


def run_report(ctx) -> dict:
    start = time.perf_counter()
    storage, paths = ctx.storage, ctx.paths
    cfg = ctx.config.report
    images_report = _read_json_or_none(storage, paths.images_report)
    ingest_report = _read_json_or_none(storage, paths.ingest_report)

    embeddings_uri, sample = _report_sample(ctx, cfg.max_works)
    vector_ids, vectors = read_sample_vectors(ctx.storage, sample) if sample.rows is not None else ([], None)
    links_uri = _report_links_uri(ctx)
    sheet_ids = strongest_links(storage, links_uri, _MAX_SHEETS) if links_uri else []
    sheet_links = filtered_rows(storage, links_uri, set(sheet_ids)) if sheet_ids else None

    # one pass over records/: counts per collection (whole run) + the rows of the works the page shows
    wanted = set(vector_ids) | set(sheet_ids)
    if sheet_links is not None:
        wanted |= set(sheet_links.column("neighbor_id").to_pylist())
    records_read = count_and_select_records(storage, paths.records, wanted)
    meta = {r["object_id"]: r for r in records_read.rows.to_pylist()}

    has_vectors = vectors is not None and len(vector_ids) >= 3
    sampled = set(vector_ids)
    curate_records = records_read.rows.filter(pc.is_in(records_read.rows["object_id"],
                                                       value_set=pa.array(sorted(sampled), pa.string())))
    # walks start from the sheets' works; those left out of the sample are replaced by sampled works
    walk_candidates = [i for i in sheet_ids if i in sampled]
    if len(walk_candidates) < len(sheet_ids) or not sheet_ids:
        first = set(walk_candidates)
        walk_candidates += [i for i in vector_ids if i not in first]
    curated = _curate(cfg, curate_records, vectors, vector_ids, walk_candidates, meta) if has_vectors else {}

    # Thumbnails only for the works shown (streamed), so the page stays small for any collection size.
    shown = set(vector_ids[:_MAX_MAP_POINTS]) | set(sheet_ids) | curated.get("shown", set())
    if sheet_links is not None:
        shown |= set(sheet_links.column("neighbor_id").to_pylist())
    thumbs = _thumbnails(storage, paths.images, shown) if storage.exists(paths.images) else {}

    sections = [_overview_section(ctx, records_read, images_report, ingest_report, embeddings_uri, links_uri,
                                  sample, vector_ids, meta)]
    if images_report:
        sections.append(_download_section(images_report))
    if has_vectors:
        sections.append(_map_section(vectors, vector_ids, meta, thumbs))
        sections.append(_cluster_section(vectors, vector_ids, meta, thumbs))
    if sheet_ids:
        sections.append(_sheets_section(sheet_links, sheet_ids, meta, thumbs))
    sections += _curated_html(curated, meta, thumbs)

    page = _PAGE.format(title=html.escape(f"artsim report — {paths.root}"), body="\n".join(sections),
                        generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = join(paths.report(ctx.config.report.name), "index.html")
    storage.write_text(out, page)
    seconds = time.perf_counter() - start
    say(f"report: {out} ({len(page) / 1e6:.1f} MB, {seconds:.1f} s; {len(vector_ids)} of {sample.total} embedded "
        f"works{' (sample)' if sample.is_sample else ''})")
    return {"report_uri": out, "bytes": len(page), "seconds": round(seconds, 2), "works": sample.total,
            "sampled_works": len(vector_ids), "sampled": sample.is_sample}


def _curate(cfg, records, vectors, vector_ids, walk_candidates, meta) -> dict:
    """Suggested tags, vocabulary concepts and latent walks (artsim.curate), as the report config asks, plus the
    set of works they show (for thumbnails)."""
    from artsim.curate import classify_vocabulary, evaluate_tag_recommendation, latent_walk, recommend_tags

    out: dict = {"shown": set()}
    has_tags = any(records.column("subjects").to_pylist()) or any(records.column("concepts").to_pylist())
    if cfg.suggest_tags and has_tags:
        out["tags"] = recommend_tags(records, vectors, vector_ids, k=10, min_support=2)
        out["tags_evaluation"] = evaluate_tag_recommendation(records, vectors, vector_ids, k=5)
        best_first = sorted(out["tags"], key=lambda r: -max((t["score"] for t in r["tags"]), default=0.0))
        for rec in best_first[:_MAX_SHEETS]:  # the ones tag_recommendations_html shows
            out["shown"] |= {rec["object_id"]} | {e["object_id"] for t in rec["tags"] for e in t["evidence"]}
    if cfg.classify_vocabulary:
        from artsim.curate import known_concepts
        from artsim.curate.common import records_by_id

        # Only the works the section lists are classified (the text model costs ~5 ms a work on a CPU); every
        # sampled work's known concepts still vote in the image signal, so those rows come out as if all were run.
        listed = list(records_by_id(records).values())[:_MAX_VOCABULARY_ROWS]
        out["vocabulary"] = classify_vocabulary(listed, vectors=vectors, vector_ids=vector_ids,
                                                known=known_concepts(records))
        out["shown"] |= {c["object_id"] for c in out["vocabulary"][:_MAX_VOCABULARY_ROWS]}
    out["walks"] = [latent_walk(vectors, vector_ids, a, b, steps=8)
                    for a, b in walk_endpoints(walk_candidates, meta, cfg.latent_walks)]
    out["shown"] |= {step["object_id"] for walk in out["walks"] for step in walk}
    return out


def _curated_html(curated: dict, meta: dict, thumbs: dict) -> list[str]:
    from artsim.curate.html import tag_recommendations_html, vocabulary_html, walk_html

    out = []
    if "tags" in curated:
        out.append(tag_recommendations_html(curated["tags"], meta, thumbs, evaluation=curated["tags_evaluation"]))
    if "vocabulary" in curated:
        out.append(vocabulary_html(curated["vocabulary"], meta, thumbs))
    out += [walk_html(walk, meta, thumbs) for walk in curated.get("walks", [])]
    return out


def walk_endpoints(candidates: list[str], meta: dict, n: int) -> list[tuple[str, str]]:
    """Up to n (start, end) pairs of works from different collections (the walk crosses museums)."""
    pairs = []
    for i, a in enumerate(candidates):
        for b in reversed(candidates[i + 1:]):
            if len(pairs) >= n:
                return pairs
            if meta.get(a, {}).get("collection") != meta.get(b, {}).get("collection"):
                pairs.append((a, b))
                break
    return pairs


# -- inputs ---------------------------------------------------------------------------------------------------------

def _read_json_or_none(storage, uri):
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


def _report_sample(ctx, max_works: int) -> tuple[Optional[str], Sample]:
    """The embeddings the index stage uses (same rule: index.embeddings, else embed's model key, else the only
    complete directory) and the rows of them the report reads; nothing when the run has none yet."""
    from artsim.index import embeddings_key
    from artsim.index.build import check_embedding_type, fixed_dim

    try:
        key = embeddings_key(ctx)
    except ConfigError:  # no embeddings in this run (yet): the report shows what there is
        return None, Sample()
    uri = ctx.paths.embeddings(key)
    if not ctx.storage.is_complete(uri):  # index.embeddings names a directory that is not written (yet)
        return None, Sample()
    files, dim = [], None
    for file_uri in dataset_files(ctx.storage, uri):
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
        for batch in _iter_batches(storage, file_uri, ["object_id"]):
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


def _report_links_uri(ctx) -> Optional[str]:
    """The links the links stage writes for this config (links.name, else index.name, else the embeddings key)."""
    from artsim.links import links_name

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
    for file_uri in dataset_files(storage, links_uri):
        for batch in _iter_batches(storage, file_uri, ["object_id", "rank", "score"]):
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
    for file_uri in dataset_files(storage, uri):
        for batch in _iter_batches(storage, file_uri, columns):
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


def dataset_files(storage, uri: str) -> list[str]:
    """The Parquet files of a complete dataset directory (name order), or the file itself; like read_table, a
    missing or incomplete directory is an error."""
    import pyarrow.fs as pafs

    fs, path = storage.arrow_fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ArtsimError(f"{uri}: not found (has the stage that writes it run?)")
    if info.type == pafs.FileType.File:
        return [uri]
    if not storage.is_complete(uri):
        raise ArtsimError(f"{uri}: incomplete output (no _SUCCESS marker); re-run the stage that writes it")
    return sorted(storage.parquet_files(uri))


def _footer(storage, file_uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(file_uri)
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
        return meta, meta.schema.to_arrow_schema()


def _iter_batches(storage, file_uri: str, columns: Optional[list[str]], batch_rows: int = _BATCH_ROWS
                  ) -> Iterator[pa.RecordBatch]:
    """Record batches of one Parquet file, only ``columns`` (those of them it has; all when None)."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(file_uri)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, buffer_size=1 << 20)
        names = parquet.schema_arrow.names
        cols = None if columns is None else [c for c in columns if c in names]
        yield from parquet.iter_batches(batch_size=batch_rows, columns=cols)


def _thumbnails(storage, images_uri: str, wanted: set[str]) -> dict[str, str]:
    """object_id -> data URI of a small JPEG, for the wanted ids (streamed in small batches: images are large)."""
    from PIL import Image

    out: dict[str, str] = {}
    if not wanted:
        return out
    value_set = pa.array(sorted(wanted), pa.string())
    for part in storage.parquet_files(images_uri):
        for batch in _iter_batches(storage, part, ["object_id", "status", "image"], batch_rows=256):
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


# -- sections -------------------------------------------------------------------------------------------------------

def _overview_section(ctx, records_read, images_report, ingest_report, embeddings_uri, links_uri, sample,
                      vector_ids, meta) -> str:
    n_sampled = len(vector_ids)
    sampled_by_collection: dict = {}
    for object_id in vector_ids if sample.is_sample else []:
        name = (meta.get(object_id) or {}).get("collection") or object_id.split(":", 1)[0]
        sampled_by_collection[name] = sampled_by_collection.get(name, 0) + 1
    extra_head = "<th>in the sample</th>" if sample.is_sample else ""
    rows = ""
    for name, count in sorted(records_read.by_collection.items(), key=lambda item: str(item[0])):
        extra = f"<td>{sampled_by_collection.get(name, 0)}</td>" if sample.is_sample else ""
        rows += f"<tr><td>{html.escape(str(name))}</td><td>{count}</td>{extra}</tr>"
    ok = (images_report or {}).get("by_status", {}).get("ok")
    embedded = f" ({sample.total} works)" if embeddings_uri else ""
    items = [f"<li>run directory: <code>{html.escape(ctx.paths.root)}</code></li>",
             f"<li>records: {records_read.total}</li>",
             f"<li>images downloaded (ok): {ok if ok is not None else 'n/a'}</li>",
             f"<li>embeddings: {_where(embeddings_uri, 'embed')}{embedded}</li>",
             f"<li>links: {_where(links_uri, 'links')}</li>"]
    note = ""
    if sample.is_sample:
        note = (f"<p class='sample'><b>Map, clusters, suggested tags, vocabulary and latent walks are computed on a "
                f"sample: {n_sampled:,} of {sample.total:,} works, sampled per collection</b> (deterministic: the "
                f"works with the smallest hash of their object id in each collection; report.max_works = "
                f"{ctx.config.report.max_works:,}). Counts above and the neighbour sheets cover the whole run.</p>")
    ingest = ""
    if ingest_report:
        ingest = f"<details><summary>ingest report</summary><pre>{html.escape(json.dumps(ingest_report, indent=2))}</pre></details>"
    return (f"<h2>Overview</h2><ul>{''.join(items)}</ul>{note}"
            f"<table><tr><th>collection</th><th>records</th>{extra_head}</tr>{rows}</table>{ingest}")


def _where(uri, stage: str) -> str:
    return f"<code>{html.escape(uri)}</code>" if uri else f"none yet (run the {stage} stage)"


def _download_section(report: dict) -> str:
    by_status = report.get("by_status", {})
    png = _bar_chart(by_status, "images by download status") if by_status else ""
    hosts = report.get("by_host") or report.get("hosts") or {}
    host_rows = ""
    if isinstance(hosts, dict):
        for host, counts in list(hosts.items())[:20]:
            host_rows += f"<tr><td>{html.escape(str(host))}</td><td>{html.escape(json.dumps(counts))}</td></tr>"
    return (f"<h2>Download</h2>{_img(png)}"
            f"<table><tr><th>host</th><th>counts</th></tr>{host_rows}</table>"
            f"<details><summary>full download report</summary><pre>{html.escape(json.dumps(report, indent=2))}"
            f"</pre></details>")


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _map_section(vectors, ids, meta, thumbs) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = pca_2d(vectors)
    collections = [meta.get(i, {}).get("collection") or "?" for i in ids]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    for name in sorted(set(collections)):
        sel = [j for j, c in enumerate(collections) if c == name]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, label=name, alpha=0.8)
    ax.set_title("collection map (PCA of image embeddings)")
    ax.legend(loc="best", fontsize=8)
    png = _fig_png(fig)
    # thumbnail map: absolutely positioned images in a square
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    tiles = []
    for j, object_id in enumerate(ids[:_MAX_MAP_POINTS]):
        if object_id not in thumbs:
            continue
        x, y = (xy[j] - lo) / span
        m = meta.get(object_id, {})
        tip = html.escape(f"{object_id} — {m.get('title')} — {m.get('creator') or ''}")
        tiles.append(f'<img class="tile" title="{tip}" src="{thumbs[object_id]}" '
                     f'style="left:{x * 92:.2f}%;top:{(1 - y) * 92:.2f}%">')
    return (f"<h2>Map</h2><p>Works close together look alike to the model. Hover a thumbnail for its record.</p>"
            f"{_img(png)}<div class='map'>{''.join(tiles)}</div>")


def _cluster_section(vectors, ids, meta, thumbs) -> str:
    import faiss

    k = int(max(2, min(12, round(np.sqrt(len(ids) / 2)))))
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=1, spherical=True)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, assign = kmeans.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    blocks = []
    for c in range(k):
        members = [ids[j] for j in np.flatnonzero(assign[:, 0] == c)]
        if not members:
            continue
        types = _top_values([meta.get(m, {}).get("object_type") for m in members])
        cells = "".join(_card(m, meta, thumbs) for m in members[:_MAX_CLUSTER_MEMBERS])
        blocks.append(f"<h3>cluster {c + 1}: {len(members)} works · {html.escape(types)}</h3>"
                      f"<div class='row'>{cells}</div>")
    return f"<h2>Clusters (k-means, k={k})</h2>{''.join(blocks)}"


def _sheets_section(links: pa.Table, sheet_ids, meta, thumbs) -> str:
    blocks = []
    for object_id in sheet_ids:
        rows = links.filter(pc.equal(links["object_id"], object_id))
        rows = rows.take(pc.sort_indices(rows, sort_keys=[("rank", "ascending")])).to_pylist()
        cells = "".join(_card(r["neighbor_id"], meta, thumbs, f"#{r['rank']} · {r['score']:.3f}") for r in rows[:8])
        blocks.append(f"<div class='sheet'><div class='row'>{_card(object_id, meta, thumbs, 'query')}"
                      f"<div class='arrow'>→</div>{cells}</div></div>")
    return ("<h2>Neighbour sheets</h2><p>Each row: a work and its nearest works in other collections "
            "(from links/).</p>" + "".join(blocks))


def _top_values(values, n: int = 3) -> str:
    from collections import Counter

    counts = Counter(v for v in values if v)
    return ", ".join(f"{v} ({c})" for v, c in counts.most_common(n)) or "—"


def _bar_chart(counts: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=110)
    names = list(counts)
    ax.barh(names, [counts[n] for n in names])
    ax.set_title(title)
    for y, n in enumerate(names):
        ax.text(counts[n], y, f" {counts[n]}", va="center", fontsize=8)
    fig.tight_layout()
    return _fig_png(fig)


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes) -> str:
    return f"<img class='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.plot {{ max-width: 100%; }}
.map {{ position: relative; width: 100%; height: 800px; border: 1px solid #ddd; margin: 1em 0; }}
.tile {{ position: absolute; width: 48px; }} .tile:hover {{ width: 160px; z-index: 10; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }}
.card {{ width: 110px; font-size: 11px; }} .card img {{ max-width: 100px; max-height: 100px; }}
.noimg {{ width: 96px; height: 96px; background: #eee; }} .arrow {{ font-size: 32px; align-self: center; }}
.sheet {{ border-bottom: 1px solid #eee; padding: 8px 0; }}
</style></head><body>
<h1>artsim report</h1>
{body}
<p style="color:#888">generated {generated} by artsim</p>
</body></html>
"""
