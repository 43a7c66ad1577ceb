"""Pieces every format parser shares: the record builder, the "bad row" marker, and small value cleaners.

A parser is a plain function ``parse(data, collection) -> Iterator[dict | BadRow]``: it yields one canonical
record dict (all :data:`artsim.rundir.schema.RECORD_FIELDS`) per source item, or a :class:`BadRow` saying why an item
could not be read. Parsers never raise on a bad item, so one broken row never stops a job.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from artsim.ingest.dates import parse_years
from artsim.rundir.schema import LIST_FIELDS, RECORD_FIELDS, empty_record

MAX_TEXT = 20_000  # characters kept of one text value; longer values are cut (descriptions, hostile input)
MAX_LIST = 500  # items kept of one list value


@dataclass(frozen=True)
class BadRow:
    """An item of a source that could not be turned into a record."""

    position: str  # where in the source: "row 12", "items[3]", "line 7"
    reason: str

    def __str__(self) -> str:
        return f"{self.position}: {self.reason}"


def text(value: Any) -> Optional[str]:
    """A cleaned single text value: strings stripped, numbers as text, empty -> None."""
    if type(value) is str:  # the common case first: this runs for every cell of every row
        s = value.strip()
        return s[:MAX_TEXT] if s else None
    if value is None or isinstance(value, (dict, list, tuple)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(value).strip()
    if not s:
        return None
    return s[:MAX_TEXT]


def first_text(*values: Any) -> Optional[str]:
    """The first non-empty text among ``values`` (each may be a scalar or a list of scalars)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            for v in value:
                t = text(v)
                if t:
                    return t
        else:
            t = text(value)
            if t:
                return t
    return None


def text_list(value: Any, sep: Optional[str] = None) -> list[str]:
    """A list of cleaned, de-duplicated texts from a list, or from a string split on ``sep``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    elif sep is not None and isinstance(value, str):
        items = value.split(sep)
    else:
        items = [value]
    out: list[str] = []
    seen = set()
    for item in items:
        t = text(item)
        if t and t not in seen:
            seen.add(t)
            out.append(t)
            if len(out) >= MAX_LIST:
                break
    return out


def clean_local_id(value: Any) -> Optional[str]:
    """A local id as text; integral floats (CSV/Parquet numbers) lose their ".0"; control characters go."""
    t = text(value)
    if t is None:
        return None
    t = re.sub(r"[\x00-\x1f\x7f]", "", t)
    return t or None


def year(value: Any) -> Optional[int]:
    """A single year from an int or a date text (begin year), or None."""
    begin, end = parse_years(value)
    return begin if begin is not None else end


def _is_clean_list(value: Any) -> bool:
    return (type(value) is list and len(value) <= MAX_LIST and len(set(value)) == len(value)
            and all(type(v) is str and v and v == v.strip() and len(v) <= MAX_TEXT for v in value))


def make_record(collection: str, local_id: str, source: str, **fields: Any) -> dict:
    """A canonical record: every schema field present, lists as lists, texts cleaned, years derived from ``date``
    when the source gives no numeric years."""
    record = empty_record()
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:  # a bug in a parser, not bad input
        raise TypeError(f"unknown record fields {sorted(unknown)}")
    for name, value in fields.items():
        if name in LIST_FIELDS:
            # Parsers usually pass lists text_list() already cleaned; only clean again what is not yet clean.
            record[name] = value if _is_clean_list(value) else text_list(value)
        elif name in ("date_begin", "date_end"):
            record[name] = year(value) if value is not None else None
        else:
            record[name] = text(value)
    record["collection"] = collection
    record["local_id"] = local_id
    record["object_id"] = f"{collection}:{local_id}"
    record["source"] = source
    if record["date"] and record["date_begin"] is None and record["date_end"] is None:
        record["date_begin"], record["date_end"] = parse_years(record["date"])
    if (record["date_begin"] is not None and record["date_end"] is not None
            and record["date_begin"] > record["date_end"]):
        record["date_begin"], record["date_end"] = record["date_end"], record["date_begin"]
    return record


def iter_items(data: Any, keys: Iterable[str] = ("items",)) -> Iterable[tuple[str, Any]]:
    """(position, item) pairs from a parsed JSON document: a list, an object holding the list under one of
    ``keys``, or a single object."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            yield f"[{i}]", item
        return
    if isinstance(data, dict):
        for key in keys:
            if isinstance(data.get(key), list):
                for i, item in enumerate(data[key]):
                    yield f"{key}[{i}]", item
                return
        yield "object", data
        return
    yield "document", data
