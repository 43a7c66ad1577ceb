"""The canonical tables of the run directory (see docs/DESIGN.md) as pyarrow schemas."""
from __future__ import annotations

import pyarrow as pa

# One row per artwork. object_id = "<collection>:<local id>".
RECORD_FIELDS = (
    "object_id", "collection", "local_id", "image_url", "iiif_service", "title", "creator", "date", "date_begin",
    "date_end", "culture", "medium", "object_type", "subjects", "concepts", "license", "landing_url",
    "description", "source", "sha256",
)
LIST_FIELDS = ("subjects", "concepts")

RECORDS_SCHEMA = pa.schema([
    ("object_id", pa.string()),
    ("collection", pa.string()),
    ("local_id", pa.string()),
    ("image_url", pa.string()),
    ("iiif_service", pa.string()),  # IIIF Image API service base URL, when known
    ("title", pa.string()),
    ("creator", pa.string()),
    ("date", pa.string()),  # as the source gives it
    ("date_begin", pa.int32()),  # year, for range filters
    ("date_end", pa.int32()),
    ("culture", pa.string()),
    ("medium", pa.string()),
    ("object_type", pa.string()),
    ("subjects", pa.list_(pa.string())),  # free-text terms and tags
    ("concepts", pa.list_(pa.string())),  # controlled-vocabulary URIs (AAT, Wikidata, Iconclass, Europeana)
    ("license", pa.string()),  # normalised: CC0, PDM, CC-BY-4.0, ... or the source's URI/text
    ("landing_url", pa.string()),
    ("description", pa.string()),
    ("source", pa.string()),  # source kind that produced the record
    ("sha256", pa.string()),  # optional: the source's sha256 of the file at image_url (64 lowercase hex digits)
])

# Download outcome vocabulary (docs/DESIGN.md, plus too_small, hash_mismatch and internal_error). Retryable ones are
# refetched by --retry-failed; internal_error (a bug in artsim, never an answer from a server) by every run.
STATUSES = (
    "ok", "not_found", "http_error", "timeout", "too_large", "too_small", "not_image", "decode_error",
    "hash_mismatch", "blocked_address", "robots_disallowed", "opted_out", "license_excluded", "invalid_url",
    "internal_error",
)
RETRYABLE_STATUSES = ("http_error", "timeout")
REFETCH_STATUSES = ("internal_error",)

IMAGES_SCHEMA = pa.schema([
    ("object_id", pa.string()),
    ("status", pa.string()),
    ("http_status", pa.int32()),
    ("error", pa.string()),
    ("url_final", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sha256", pa.string()),
    ("image", pa.binary()),
])


def empty_record() -> dict:
    """A record dict with every canonical field present (None / empty lists)."""
    return {name: ([] if name in LIST_FIELDS else None) for name in RECORD_FIELDS}


def records_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA)


# triplets/: one row per (anchor, positive, negative); reason says why anchor and positive are alike.
TRIPLETS_SCHEMA = pa.schema([
    ("anchor_id", pa.string()),
    ("positive_id", pa.string()),
    ("negative_id", pa.string()),
    ("reason", pa.string()),
    ("strategy", pa.string()),
])

# links/<name>/: one row per (work, neighbour in another collection), rank 1 = most similar.
LINKS_SCHEMA = pa.schema([
    ("object_id", pa.string()),
    ("neighbor_id", pa.string()),
    ("rank", pa.int32()),
    ("score", pa.float32()),
    ("neighbor_collection", pa.string()),
])
