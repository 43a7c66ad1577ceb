"""The Met Open Access ``MetObjects.csv`` (https://github.com/metmuseum/openaccess).

UTF-8 with a BOM; multi-valued cells are ``|``-joined; ``Tags``, ``Tags AAT URL`` and ``Tags Wikidata URL`` are
parallel lists. The file has no image URLs: records get ``image_url`` None unless the source sets
``image_url_template`` (e.g. a mirror keyed by object id).
"""
from __future__ import annotations

from typing import Iterable, Iterator

from artsim.ingest.common import BadRow, clean_local_id, first_text, make_record, text_list
from artsim.ingest.dates import parse_years

SOURCE = "met_csv"
REQUIRED_COLUMNS = ("Object ID", "Title")


def parse_met_csv(rows: Iterable[tuple[str, dict]], collection: str) -> Iterator[dict | BadRow]:
    """``rows``: (position, row dict keyed by the header) pairs, as :func:`artsim.ingest.readers.csv_rows` gives."""
    for position, row in rows:
        if isinstance(row, BadRow):
            yield row
            continue
        local_id = clean_local_id(row.get("Object ID"))
        if local_id is None:
            yield BadRow(position, "empty 'Object ID'")
            continue
        names = text_list(row.get("Artist Display Name"), sep="|")
        roles = (row.get("Artist Role") or "").split("|")
        public = (row.get("Is Public Domain") or "").strip().lower() == "true"
        date = row.get("Object Date")
        begin, end = _year_cell(row.get("Object Begin Date")), _year_cell(row.get("Object End Date"))
        if not first_text(date) and not begin and not end:
            begin = end = None  # 0/0 means "no date" in the Met's data
        if begin is None and end is None:
            begin, end = parse_years(date)
        yield make_record(
            collection, local_id, SOURCE,
            image_url=None,
            title=row.get("Title"),
            creator=_primary_artist(names, roles),
            date=date,
            date_begin=begin,
            date_end=end,
            culture=row.get("Culture"),
            medium=row.get("Medium"),
            object_type=first_text(row.get("Object Name"), row.get("Classification")),
            subjects=text_list(row.get("Tags"), sep="|"),
            concepts=text_list((row.get("Tags AAT URL") or "").split("|")
                               + (row.get("Tags Wikidata URL") or "").split("|")),
            license="CC0" if public else None,
            landing_url=row.get("Link Resource"),
            description=None,
        )


def _primary_artist(names: list[str], roles: list[str]):
    """The first constituent whose role is the maker ("Artist", "Maker", ...), else the first listed."""
    for name, role in zip(names, roles):
        if role.strip().lower() in ("artist", "maker", "painter", "author", "designer", "photographer"):
            return name
    return names[0] if names else None


def _year_cell(value):
    value = (value or "").strip()
    if value.lstrip("-").isdigit():
        y = int(value)
        return y if -100_000 <= y <= 2_200 else None
    return None
