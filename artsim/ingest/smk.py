"""SMK (Statens Museum for Kunst) API search responses (https://open.smk.dk/en/api): ``{"items": [...]}``.

Some SMK dumps store list fields as JSON-encoded strings (``"content_description": "[\\"...\\"]"``); those are
decoded. The object number is the local id; SMK's public-domain works are CC0.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from artsim.ingest.common import BadRow, clean_local_id, first_text, iter_items, make_record, text_list
from artsim.ingest.licenses import normalize_license

SOURCE = "smk_json"
FRONTEND = "https://open.smk.dk/artwork/image/"


def parse_smk(data: Any, collection: str) -> Iterator[dict | BadRow]:
    for position, item in iter_items(data, keys=("items",)):
        if not isinstance(item, dict):
            yield BadRow(position, f"expected a JSON object, got {type(item).__name__}")
            continue
        local_id = clean_local_id(item.get("object_number"))
        if local_id is None:
            yield BadRow(position, "no object_number")
            continue
        titles = _list(item.get("titles"))
        production = _list(item.get("production"))
        dates = _list(item.get("production_date"))
        first_date = dates[0] if dates and isinstance(dates[0], dict) else {}
        iiif_id = first_text(item.get("image_iiif_id"))
        rights = item.get("rights")
        license_code = normalize_license(rights)
        if license_code is None and item.get("public_domain") is True:
            license_code = "CC0"
        # Depicted subjects and people; the object name is object_type, not a subject.
        subjects = text_list(_list(item.get("content_subject"))) + text_list(_list(item.get("content_person")))
        yield make_record(
            collection, local_id, SOURCE,
            image_url=first_text(item.get("image_thumbnail"), item.get("image_native")),
            iiif_service=iiif_id,
            title=first_text([_field(t, "title") for t in titles], [_field(t, "translation") for t in titles]),
            creator=first_text([_field(p, "creator") for p in production]),
            date=first_text(first_date.get("period")),
            date_begin=first_date.get("start"),
            date_end=first_date.get("end"),
            culture=first_text([_field(p, "creator_nationality") for p in production]),
            medium=first_text([_field(t, "technique") for t in _list(item.get("techniques"))]),
            object_type=first_text([_field(o, "name") for o in _list(item.get("object_names"))]),
            subjects=subjects,
            concepts=[],
            license=license_code,
            landing_url=first_text(item.get("frontend_url")) or FRONTEND + local_id,
            description=first_text(_list(item.get("content_description"))),
        )


def _list(value: Any) -> list:
    """A list field, decoding the JSON-in-a-string form; anything else becomes an empty list or [value]."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return [value]
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _field(obj: Any, key: str):
    return obj.get(key) if isinstance(obj, dict) else None
