"""The Met Collection API object JSON (https://metmuseum.github.io/#object): ``GET /objects/{objectID}`` bodies.

Accepts a list of objects, a single object, ``{"objects": [...]}`` or JSON lines (the reader turns JSON lines into
a list). Met Open Access works (``isPublicDomain: true``) are CC0.
"""
from __future__ import annotations

from typing import Any, Iterator

from artsim.ingest.common import BadRow, clean_local_id, first_text, iter_items, make_record, text_list

SOURCE = "met_api_json"


def parse_met_api(data: Any, collection: str) -> Iterator[dict | BadRow]:
    for position, obj in iter_items(data, keys=("objects", "items")):
        if not isinstance(obj, dict):
            yield BadRow(position, f"expected a JSON object, got {type(obj).__name__}")
            continue
        local_id = clean_local_id(obj.get("objectID"))
        if local_id is None:
            yield BadRow(position, "no objectID")
            continue
        tags = [t for t in (obj.get("tags") or []) if isinstance(t, dict)] if isinstance(obj.get("tags"), list) else []
        concepts = []
        for tag in tags:
            concepts += [tag.get("AAT_URL"), tag.get("Wikidata_URL")]
        begin, end = _int_year(obj.get("objectBeginDate")), _int_year(obj.get("objectEndDate"))
        if not first_text(obj.get("objectDate")) and not begin and not end:
            begin = end = None  # the API writes 0/0 for "no date"
        yield make_record(
            collection, local_id, SOURCE,
            image_url=first_text(obj.get("primaryImageSmall"), obj.get("primaryImage")),
            title=obj.get("title"),
            creator=obj.get("artistDisplayName"),
            date=obj.get("objectDate"),
            date_begin=begin,
            date_end=end,
            culture=obj.get("culture"),
            medium=obj.get("medium"),
            object_type=first_text(obj.get("objectName"), obj.get("classification")),
            subjects=text_list([t.get("term") for t in tags]),
            concepts=text_list(concepts),
            license="CC0" if obj.get("isPublicDomain") is True else None,
            landing_url=obj.get("objectURL"),
            description=None,
        )


def _int_year(value: Any):
    # The API gives 0 for "unknown" begin/end dates alongside an empty objectDate.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
