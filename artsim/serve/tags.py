"""``GET /v1/{index}/tags``: suggested tags for one work, computed as the report computes them.

The report calls :func:`artsim.curate.recommend_tags` with k=10 neighbours and min_support=2 over every work's
vector. For one work the same answer comes from the work and its k nearest neighbours in the index: passing those
k+1 works (their stored vectors and tags) to ``recommend_tags`` makes the work's neighbours exactly the index's
neighbours, and the tags, scores and evidence follow from the same function the report uses (so a better
``recommend_tags`` improves the server without changes here).

Tags (subjects, concepts) come from the id map when the index kept them (``index.metadata`` lists ``subjects`` /
``concepts``; list columns are stored ``|``-joined), else from the run's ``records/`` beside ``index/`` (only
``object_id``, ``title``, ``subjects`` and ``concepts`` are read, once per index version, aligned to the id map).
"""
from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.compute as pc

from artsim.errors import ArtsimError
from artsim.serving import ShardedIndex

REPORT_K = 10  # artsim.report: recommend_tags(records, vectors, ids, k=10, min_support=2)
REPORT_MIN_SUPPORT = 2
TAG_COLUMNS = ("title", "subjects", "concepts")
TEXT_COLUMNS = ("object_type", "medium", "culture", "description")  # what the text signal compares labels with
_build_lock = threading.Lock()
_encoder_lock = threading.Lock()
_encoder: list = []  # the offline sentence model, loaded on the first request that asks for the text signal


def tag_records_table(index: ShardedIndex, cache: dict) -> pa.Table:
    """(title, subjects, concepts) rows aligned with ``index.table``; cached in ``cache`` (per index version)."""
    if "tag_records" in cache:
        return cache["tag_records"]
    with _build_lock:
        if "tag_records" not in cache:
            cache["tag_records"] = _load_tag_records(index)
    return cache["tag_records"]


def _load_tag_records(index: ShardedIndex) -> pa.Table:
    names = index.table.column_names
    if "subjects" in names or "concepts" in names:
        cols = {c: index.table.column(c) for c in TAG_COLUMNS + TEXT_COLUMNS if c in names}
        for c in ("subjects", "concepts"):
            if c in cols and not pa.types.is_list(cols[c].type):
                cols[c] = pc.split_pattern(pc.cast(cols[c], pa.string()), "|")
        return pa.table(cols)
    run_root = index.uri.rstrip("/").rsplit("/", 2)[0]  # <run>/index/<name> -> <run>
    records_uri = f"{run_root}/records"
    storage = index.storage
    if not storage.is_complete(records_uri):
        raise ArtsimError(f"index {index.name!r} keeps no subjects or concepts (add them to index.metadata) and "
                          f"there is no complete records/ beside it ({records_uri}): no tags to suggest")
    records = storage.read_table(records_uri, columns=["object_id", *TAG_COLUMNS, *TEXT_COLUMNS])
    positions = pc.index_in(index.table.column("object_id"), value_set=records.column("object_id"))
    return pa.table({c: records.column(c).take(positions) for c in TAG_COLUMNS + TEXT_COLUMNS
                     if c in records.column_names})


def sentence_encoder():
    with _encoder_lock:
        if not _encoder:
            from artsim.text import load_sentence_encoder

            _encoder.append(load_sentence_encoder())
    return _encoder[0]


def suggest_tags(index: ShardedIndex, cache: dict, object_id: str, k: int = REPORT_K,
                 min_support: int = REPORT_MIN_SUPPORT, text_weight: float = 0.0) -> list[dict]:
    """Tags the work lacks, best first: from its neighbours (each with the neighbours behind it) and, with
    ``text_weight`` > 0, from the similarity of the tag labels its neighbours carry to its metadata text (each with
    the words behind it), mixed as ``recommend_tags`` does."""
    from artsim.curate import recommend_tags

    hits = index.search_ids([object_id], k)[0]
    ids = [object_id] + [h["object_id"] for h in hits]
    vectors = index.vectors_for_ids(ids)
    table = tag_records_table(index, cache).take(pa.array(index.rows(ids), pa.int64()))
    records = [dict(row, object_id=oid) for oid, row in zip(ids, table.to_pylist())]
    encoder = sentence_encoder() if text_weight > 0 else None
    for rec in recommend_tags(records, vectors, ids, k=k, min_support=min_support, text_encoder=encoder,
                              text_weight=text_weight, only={object_id}):
        if rec["object_id"] == object_id:
            return rec["tags"]
    return []
