"""The data-quality audit of a run directory, streamed in bounded memory (the computations: artsim.curate.audit).

Passes over records/ (a few columns at a time, 65,536-row batches): completeness and licences per collection,
distinct creator and subject spellings (bounded), then hash-partitioned passes for duplicate object ids and image
URLs. One pass over images/ (status + host) for failed links by host. Perceptual hashes are computed for the
images of a stable per-collection sample of at most ``max_images`` works (``artsim.rundir.sample``: the same rule
as the rest of the report), and embedding near-duplicates for the report's sampled vectors. Driver memory is
O(max_images + duplicate budget + distinct spellings kept), whatever the run's size.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from typing import Optional
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.curate.audit import (AUDIT_FIELDS, BoundedCounter, DuplicateFinder, FieldCompleteness, classify_status,
                                 dhash, hamming, hash_pairs, near_duplicate_pairs, phash, variant_groups)
from artsim.rundir.names import collection_of

_BATCH = 65_536
PHASH_MAX_DISTANCE = 6  # of 64 bits: a resized / recompressed / slightly retouched copy stays within this
DHASH_MAX_DISTANCE = 10
EMBEDDING_MIN_COSINE = 0.95  # after removing the mean vector
MAX_PAIRS = 40  # near-duplicate pairs listed (each with two thumbnails); the counts cover every pair found


def run_audit(storage, paths, vector_ids: list, vectors: Optional[np.ndarray], max_images: int,
              duplicate_budget: int = 2_000_000) -> dict:
    """The whole audit; the report stage runs ``audit_records_and_images`` first (before it holds anything else,
    so the peaks do not add up) and ``embedding_pairs`` once it has the sampled vectors."""
    out = audit_records_and_images(storage, paths, max_images, duplicate_budget)
    out["near_duplicate_embeddings"] = embedding_pairs(vector_ids, vectors) if vectors is not None else None
    return out


def audit_records_and_images(storage, paths, max_images: int, duplicate_budget: int = 2_000_000) -> dict:
    records_files = storage.dataset_files(paths.records) if storage.is_complete(paths.records) else []
    out: dict = {"records": 0, "collections": {}}
    if records_files:
        out.update(_records_audit(storage, records_files, duplicate_budget))
    images_files = storage.dataset_files(paths.images) if storage.exists(paths.images) else []
    if images_files:
        out["image_links"] = _links_by_host(storage, images_files)
        out["near_duplicate_images"] = _perceptual_pairs(storage, images_files, max_images)
    else:
        out["image_links"] = None
        out["near_duplicate_images"] = None
    return out


def _records_audit(storage, files, duplicate_budget) -> dict:
    completeness = FieldCompleteness()
    creators, terms = BoundedCounter(), BoundedCounter()
    total = 0
    columns = ["object_id", "collection", *AUDIT_FIELDS]
    for file_uri in files:
        for batch in storage.iter_batches(file_uri, columns, _BATCH):
            total += batch.num_rows
            completeness.update(batch)
            if "creator" in batch.schema.names:
                creators.update(batch.column("creator"))
            if "subjects" in batch.schema.names:
                terms.update(pc.list_flatten(batch.column("subjects")))

    def stream(column):
        def batches():
            for file_uri in files:
                for batch in storage.iter_batches(file_uri, ["object_id", "collection", column], _BATCH):
                    if column not in batch.schema.names:
                        continue
                    ids = pc.fill_null(batch.column("object_id"), "")
                    coll = batch.column("collection") if "collection" in batch.schema.names else \
                        pa.nulls(batch.num_rows, pa.string())
                    yield pc.fill_null(batch.column(column), ""), ids, coll
        return batches

    duplicates = {
        "object_id": DuplicateFinder(stream("object_id"), total, duplicate_budget).run(),
        "image_url": DuplicateFinder(stream("image_url"), total, duplicate_budget).run(),
    }
    return {"records": total, "collections": completeness.result(), "duplicates": duplicates,
            "variants": {"creator": variant_groups(creators.counts, "creator"),
                         "term": variant_groups(terms.counts, "term"),
                         "distinct_creators_read": len(creators.counts), "creator_spellings_not_read": creators.dropped,
                         "distinct_terms_read": len(terms.counts), "term_spellings_not_read": terms.dropped}}


def _host(batch, names) -> list:
    if "host" in names:
        return [h or "(local)" for h in batch.column("host").to_pylist()]
    if "url_final" in names:
        return [(urlsplit(u).hostname or "(local)") if u else "(unknown)" for u in batch.column("url_final").to_pylist()]
    return ["(unknown)"] * batch.num_rows


def _links_by_host(storage, files) -> dict:
    by_host: dict = defaultdict(Counter)
    for file_uri in files:
        for batch in storage.iter_batches(file_uri, ["status", "host", "url_final"], _BATCH):
            names = batch.schema.names
            for host, status in zip(_host(batch, names), batch.column("status").to_pylist()):
                by_host[host][status or "(none)"] += 1
    hosts = []
    for host, statuses in by_host.items():
        category = Counter()
        for status, n in statuses.items():
            category[classify_status(status)] += n
        hosts.append({"host": host, "total": sum(statuses.values()), "ok": category["ok"],
                      "broken": category["broken"], "blocked": category["blocked"],
                      "opted_out": category["opted_out"], "other": category["other"], "statuses": dict(statuses)})
    hosts.sort(key=lambda h: (-(h["total"] - h["ok"]), -h["total"], h["host"]))
    totals = Counter()
    for h in hosts:
        for key in ("total", "ok", "broken", "blocked", "opted_out", "other"):
            totals[key] += h[key]
    return {"totals": dict(totals), "hosts": hosts[:50], "hosts_total": len(hosts)}


def _perceptual_pairs(storage, files, max_images: int) -> dict:
    """pHash / dHash of the images of a stable per-collection sample of ok images, and the pairs within the
    thresholds (within and across collections)."""
    from PIL import Image

    from artsim.rundir.sample import sample_rows, stream_batches

    chosen = sample_rows(storage, files, max_images, seed=0).rows
    ids, colls, ph, dh = [], [], [], []
    undecodable = 0
    for first, batch in stream_batches(storage, files, ("object_id", "status", "image"), 256):
        lo, hi = np.searchsorted(chosen, [first, first + batch.num_rows])
        local = chosen[lo:hi] - first
        if not len(local):
            continue
        picked = batch.take(pa.array(local))
        for row in picked.to_pylist():
            if row.get("status") != "ok" or not row.get("image") or not row.get("object_id"):
                continue
            try:
                with Image.open(io.BytesIO(row["image"])) as im:
                    im.draft("L", (128, 128))  # JPEG: decode at a reduced scale (the hashes read 32x32)
                    gray = im.convert("L")
                p, d = phash(gray), dhash(gray)
            except Exception:  # a bad stored image is counted, never fatal
                undecodable += 1
                continue
            ids.append(row["object_id"])
            colls.append(collection_of(row["object_id"]))
            ph.append(p)
            dh.append(d)
    pairs = []
    for i, j, d in hash_pairs(np.array(ph, dtype=np.uint64), PHASH_MAX_DISTANCE):
        dd = hamming(dh[i], dh[j])
        if dd <= DHASH_MAX_DISTANCE:
            pairs.append({"a": ids[i], "b": ids[j], "phash_distance": d, "dhash_distance": dd,
                          "across_collections": colls[i] != colls[j]})
    return {"images_hashed": len(ids), "undecodable": undecodable, "phash_max_distance": PHASH_MAX_DISTANCE,
            "dhash_max_distance": DHASH_MAX_DISTANCE, "pairs_found": len(pairs),
            "across_collections": sum(p["across_collections"] for p in pairs), "pairs": pairs[:MAX_PAIRS]}


def embedding_pairs(vector_ids: list, vectors: np.ndarray) -> dict:
    found = near_duplicate_pairs(vectors, EMBEDDING_MIN_COSINE)
    pairs = [{"a": vector_ids[i], "b": vector_ids[j], "centred_cosine": round(s, 4),
              "across_collections": collection_of(vector_ids[i]) != collection_of(vector_ids[j])}
             for i, j, s in found]
    return {"works_compared": len(vector_ids), "min_centred_cosine": EMBEDDING_MIN_COSINE,
            "pairs_found": len(pairs), "across_collections": sum(p["across_collections"] for p in pairs),
            "pairs": pairs[:MAX_PAIRS]}


def audit_shown_ids(audit: dict) -> set:
    """Works whose thumbnails the audit section shows (both sides of each listed pair)."""
    shown = set()
    for key in ("near_duplicate_images", "near_duplicate_embeddings"):
        for pair in (audit.get(key) or {}).get("pairs", []):
            shown |= {pair["a"], pair["b"]}
    return shown
