"""Generic tables (CSV, JSON lines, Parquet) with a column mapping: canonical field <- source column.

- ``local_id`` is required: mapped, or a column literally named ``local_id`` or ``id``.
- A column named exactly like a canonical field is used when the mapping does not name that field.
- List fields (``subjects``, ``concepts``) split a string on ``|`` (surrounding spaces dropped); list values (JSON,
  Parquet) are taken as they are.
- ``collection`` may be mapped to a column to spread one file over several collections (the source's
  ``collection`` is the fallback for empty cells).
- ``date_begin`` / ``date_end`` take integer years; unmapped, they are derived from ``date``.
- ``license`` values are normalised (``CC BY 4.0`` -> ``CC-BY-4.0``).
- ``sha256`` (the source's hash of the file at ``image_url``; the download checks it) is 64 hex digits, optionally
  prefixed ``sha256:``; stored lowercase. Any other non-empty value makes the row bad (a check we could not do).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from artsim.errors import ConfigError
from artsim.ingest.common import BadRow, clean_local_id, make_record, text, text_list
from artsim.ingest.licenses import normalize_license
from artsim.rundir.schema import LIST_FIELDS, RECORD_FIELDS

SOURCE = "table"
MAPPABLE_FIELDS = tuple(f for f in RECORD_FIELDS if f not in ("object_id", "source"))
LIST_SEPARATOR = "|"


def resolve_mapping(mapping: dict[str, str], columns: Iterable[str], key: str, uri: str) -> dict[str, str]:
    """The effective mapping (canonical field -> column) after checking it against the file's columns.

    ``key`` is the config path of the source (``sources.3``); errors name ``sources.3.mapping.<field>``.
    """
    columns = list(columns)
    available = set(columns)
    shown = ", ".join(columns[:40]) + (" ..." if len(columns) > 40 else "")
    for field, column in mapping.items():
        if field not in MAPPABLE_FIELDS:
            raise ConfigError(f"{key}.mapping.{field}",
                              f"not a canonical field (mappable: {', '.join(MAPPABLE_FIELDS)})")
        if column not in available:
            raise ConfigError(f"{key}.mapping.{field}", f"column {column!r} does not exist in {uri} "
                                                        f"(columns: {shown})")
    effective = dict(mapping)
    for field in MAPPABLE_FIELDS:
        if field not in effective and field in available:
            effective[field] = field
    if "local_id" not in effective:
        if "id" in available:
            effective["local_id"] = "id"
        else:
            raise ConfigError(f"{key}.mapping.local_id",
                              f"required: name the column that holds each row's id in {uri} (columns: {shown})")
    return effective


def parse_table(rows: Iterable[tuple[str, Any]], collection: str, mapping: dict[str, str]) -> Iterator[dict | BadRow]:
    """``rows``: (position, row dict | BadRow) pairs; ``mapping`` as returned by :func:`resolve_mapping`."""
    for position, row in rows:
        if isinstance(row, BadRow):
            yield row
            continue
        local_id = clean_local_id(row.get(mapping["local_id"]))
        if local_id is None:
            yield BadRow(position, f"empty id column {mapping['local_id']!r}")
            continue
        row_collection = collection
        if "collection" in mapping:
            row_collection = text(row.get(mapping["collection"])) or collection
            if ":" in row_collection:
                yield BadRow(position, f"collection {row_collection!r} contains ':'")
                continue
        fields: dict[str, Any] = {}
        for field, column in mapping.items():
            if field in ("local_id", "collection"):
                continue
            value = row.get(column)
            if field in LIST_FIELDS:
                fields[field] = text_list(value, sep=LIST_SEPARATOR) if isinstance(value, str) else text_list(value)
            elif field == "license":
                fields[field] = normalize_license(value)
            elif field == "sha256":
                fields[field] = normalize_sha256(value)
                if fields[field] is False:
                    break
            else:
                fields[field] = value
        if fields.get("sha256") is False:
            yield BadRow(position, f"sha256 {text(row.get(mapping['sha256']))!r} is not 64 hex digits")
            continue
        yield make_record(row_collection, local_id, SOURCE, **fields)


_SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


def normalize_sha256(value: Any):
    """64 lowercase hex digits, None when empty, False when something else (the row is bad)."""
    value = (text(value) or "").strip().lower()
    if not value:
        return None
    m = _SHA256.fullmatch(value)
    return m.group(1) if m else False
