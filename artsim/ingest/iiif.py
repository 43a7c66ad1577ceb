"""IIIF Presentation manifests, version 2 (``sequences/canvases/images/resource/service @id``) and version 3
(``items`` Canvas → AnnotationPage → Annotation → ``body`` with ``service`` ``id``): one record per manifest, from
its first canvas image, with ``iiif_service`` set to the Image API service base so the download stage can ask the
server for a resized rendition.

Input may hold one manifest, a list of manifests, JSON lines of manifests, or a IIIF Collection that embeds its
manifests. A collection that only references manifests by URL yields a bad row per reference: ingest does not
fetch from the network.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

from artsim.ingest.common import BadRow, clean_local_id, first_text, make_record, text_list
from artsim.ingest.licenses import normalize_license

SOURCE = "iiif_manifest"

# metadata labels (lower-cased) -> canonical field; first match wins.
METADATA_FIELDS = {
    "title": "title", "titel": "title", "object title": "title",
    "creator": "creator", "artist": "creator", "artist/maker": "creator", "maker": "creator", "author": "creator",
    "kunstner": "creator", "künstler": "creator", "painter": "creator",
    "date": "date", "dated": "date", "date made": "date", "datering": "date", "datierung": "date", "period": "date",
    "culture": "culture", "nationality": "culture",
    "medium": "medium", "materials": "medium", "technique": "medium", "medium and support": "medium",
    "teknik": "medium",
    "object type": "object_type", "type": "object_type", "classification": "object_type",
    "object name": "object_type", "genstandstype": "object_type",
    "subject": "subjects", "subjects": "subjects", "keywords": "subjects", "tags": "subjects", "motiv": "subjects",
    "identifier": "local_id", "object number": "local_id", "inventory number": "local_id",
    "accession number": "local_id", "inventarnummer": "local_id", "objektnummer": "local_id",
}
_TAG = re.compile(r"<[^>]+>")


def parse_iiif(data: Any, collection: str) -> Iterator[dict | BadRow]:
    for position, manifest in _manifests(data, "document"):
        if isinstance(manifest, BadRow):
            yield manifest
            continue
        try:
            yield _manifest_record(manifest, collection)
        except _Unusable as exc:
            yield BadRow(position, str(exc))


class _Unusable(Exception):
    pass


def _manifests(data: Any, position: str) -> Iterator[tuple[str, Any]]:
    if isinstance(data, list):
        for i, item in enumerate(data):
            yield from _manifests(item, f"[{i}]")
        return
    if not isinstance(data, dict):
        yield position, BadRow(position, f"expected a JSON object, got {type(data).__name__}")
        return
    kind = _type(data)
    if kind in ("collection", "sc:collection"):
        members = data.get("manifests") or data.get("items") or data.get("members") or []
        for i, member in enumerate(members if isinstance(members, list) else []):
            where = f"{position}.manifests[{i}]"
            if isinstance(member, dict) and (member.get("sequences") or (member.get("items") and
                                                                          _type(member) == "manifest")):
                yield from _manifests(member, where)
            else:
                ref = (member.get("@id") or member.get("id")) if isinstance(member, dict) else member
                yield where, BadRow(where, f"collection references manifest {ref!r} without embedding it "
                                           "(ingest does not fetch; save the manifests and list them as sources)")
        return
    yield position, data


def _type(obj: dict) -> str:
    t = obj.get("@type") or obj.get("type") or ""
    return t.lower() if isinstance(t, str) else ""


def _manifest_record(m: dict, collection: str) -> dict:
    version = 3 if ("items" in m and "sequences" not in m) else 2
    image_url, service = (_first_image_v3(m) if version == 3 else _first_image_v2(m))
    manifest_id = first_text(m.get("id"), m.get("@id"))
    meta = _metadata(m.get("metadata"))
    label = _value_text(m.get("label"))
    local_id = clean_local_id(meta.get("local_id")) or _id_from_url(manifest_id)
    if local_id is None:
        raise _Unusable("no identifier: neither an Identifier/Object number metadata entry nor a manifest id")
    if version == 3:
        rights = m.get("rights")
        required = m.get("requiredStatement")
        description = _value_text(m.get("summary"))
        landing = _homepage(m.get("homepage"))
    else:
        rights = m.get("license")
        required = {"value": m.get("attribution")} if m.get("attribution") else None
        description = _value_text(m.get("description"))
        landing = _homepage(m.get("related"))
    license_code = normalize_license(_value_text(rights) if not isinstance(rights, str) else rights)
    if license_code is None and isinstance(required, dict):
        statement = _value_text(required.get("value"))
        code = normalize_license(statement)
        # An attribution line ("Courtesy of ...") is not a licence; keep it only when it normalises to a code.
        if code and code != statement:
            license_code = code
    return make_record(
        collection, local_id, SOURCE,
        image_url=image_url,
        iiif_service=service,
        title=meta.get("title") or label,
        creator=meta.get("creator"),
        date=meta.get("date"),
        culture=meta.get("culture"),
        medium=meta.get("medium"),
        object_type=meta.get("object_type"),
        subjects=text_list(meta.get("subjects"), sep=";") if isinstance(meta.get("subjects"), str) else [],
        concepts=[],
        license=license_code,
        landing_url=landing,
        description=description,
    )


def _first_image_v2(m: dict) -> tuple[Optional[str], Optional[str]]:
    for seq in _list(m.get("sequences")):
        for canvas in _list(_get(seq, "canvases")):
            for anno in _list(_get(canvas, "images")):
                resource = _get(anno, "resource")
                if isinstance(resource, dict):
                    # A choice of images ("oa:Choice") puts the default under "default".
                    if resource.get("default") and isinstance(resource["default"], dict):
                        resource = resource["default"]
                    return first_text(resource.get("@id"), resource.get("id")), _service_id(resource.get("service"))
    return None, None


def _first_image_v3(m: dict) -> tuple[Optional[str], Optional[str]]:
    for canvas in _list(m.get("items")):
        if isinstance(canvas, dict) and _type(canvas) not in ("canvas", ""):
            continue
        for page in _list(_get(canvas, "items")):
            for anno in _list(_get(page, "items")):
                for body in _list(_get(anno, "body")):
                    if not isinstance(body, dict):
                        continue
                    if _type(body) == "choice" and _list(body.get("items")):
                        body = _list(body.get("items"))[0]
                        if not isinstance(body, dict):
                            continue
                    return first_text(body.get("id"), body.get("@id")), _service_id(body.get("service"))
    return None, None


def _service_id(service: Any) -> Optional[str]:
    for s in _list(service):
        if isinstance(s, dict):
            sid = first_text(s.get("id"), s.get("@id"))
            if sid:
                return sid.rstrip("/").removesuffix("/info.json")
        elif isinstance(s, str):
            return s.rstrip("/").removesuffix("/info.json")
    return None


def _metadata(entries: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in _list(entries):
        if not isinstance(entry, dict):
            continue
        label = (_value_text(entry.get("label")) or "").strip().lower().rstrip(":")
        field = METADATA_FIELDS.get(label)
        value = _value_text(entry.get("value"))
        if field and value and field not in out:
            out[field] = value
    return out


def _value_text(value: Any) -> Optional[str]:
    """Text of a IIIF value: a string, a v2 ``[{"@value", "@language"}]`` list, or a v3 language map
    ``{"en": [...]}``; English first, HTML tags removed, several values joined with "; "."""
    if value is None:
        return None
    if isinstance(value, str):
        return first_text(_TAG.sub("", value))
    if isinstance(value, dict):
        if "@value" in value:
            return _value_text(value["@value"])
        langs = [k for k in ("en", "none", "@none") if k in value] + [k for k in value if k not in
                                                                      ("en", "none", "@none")]
        for lang in langs:
            t = _value_text(value[lang])
            if t:
                return t
        return None
    if isinstance(value, list):
        english = [v for v in value if isinstance(v, dict) and str(v.get("@language", "")).startswith("en")]
        texts = text_list([_value_text(v) for v in (english or value)])
        return "; ".join(texts) if texts else None
    return first_text(value)


def _homepage(value: Any) -> Optional[str]:
    for h in _list(value):
        if isinstance(h, str):
            return first_text(h)
        if isinstance(h, dict):
            return first_text(h.get("id"), h.get("@id"))
    return None


def _id_from_url(url: Optional[str]) -> Optional[str]:
    """A local id from a manifest URL: an ``id=`` query value, else the last path segment that is not a generic
    word such as "manifest" (``.../iiif/KMS1/manifest.json`` -> ``KMS1``)."""
    if not url:
        return None
    parts = urlsplit(url)
    query_id = parse_qs(parts.query).get("id")
    if query_id and query_id[0].strip():
        return query_id[0].strip()
    generic = {"manifest", "manifest.json", "iiif", "presentation", "v2", "v3", "2", "3", "api", "json"}
    for segment in reversed([s for s in parts.path.split("/") if s]):
        if segment.lower() not in generic:
            return segment.removesuffix(".json")
    return None


def _get(obj: Any, key: str):
    return obj.get(key) if isinstance(obj, dict) else None


def _list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
