"""Europeana Search API responses (https://pro.europeana.eu/page/search): ``{"items": [...]}`` with ``id``,
``title[]``, ``dcCreator[]``, ``edmIsShownBy[]``, ``edmPreview[]``, ``rights[]``, ``edmConcept[]``, ``year[]``,
``type``, ``guid`` and the ``...LangAware`` language maps."""
from __future__ import annotations

from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

from artsim.ingest.common import BadRow, clean_local_id, first_text, iter_items, make_record, text_list
from artsim.ingest.licenses import normalize_license

SOURCE = "europeana_json"
ITEM_PAGE = "https://www.europeana.eu/item/"
PREFERRED_LANGUAGES = ("en", "def")


def parse_europeana(data: Any, collection: str) -> Iterator[dict | BadRow]:
    for position, item in iter_items(data, keys=("items",)):
        if not isinstance(item, dict):
            yield BadRow(position, f"expected a JSON object, got {type(item).__name__}")
            continue
        # "/2064105/Museu_ProvidedCHO_..." -> "2064105/Museu_ProvidedCHO_..." (dataset id / record id).
        local_id = clean_local_id((item.get("id") or "").strip("/") if isinstance(item.get("id"), str) else None)
        if local_id is None:
            yield BadRow(position, "no id")
            continue
        creators = [c for c in text_list(item.get("dcCreator")) if not _is_uri(c)]
        concept_uris = [c for c in text_list(item.get("edmConcept")) if _is_uri(c)]
        concept_labels = _lang_values(item.get("edmConceptPrefLabelLangAware"))
        yield make_record(
            collection, local_id, SOURCE,
            image_url=first_text(item.get("edmIsShownBy"), item.get("edmPreview")),
            title=first_text(item.get("title"), _lang_values(item.get("dcTitleLangAware"))),
            creator=first_text(creators, [c for c in _lang_values(item.get("dcCreatorLangAware")) if not _is_uri(c)]),
            date=first_text(item.get("year"), [_label(t) for t in _as_list(item.get("edmTimespanLabel"))]),
            culture=None,
            medium=first_text(_lang_values(item.get("dcFormatLangAware"))),
            object_type=first_text(_lang_values(item.get("dcTypeLangAware")),
                                   item.get("type").lower() if isinstance(item.get("type"), str) else None),
            subjects=text_list(concept_labels + _lang_values(item.get("dcSubjectLangAware"))),
            concepts=concept_uris,
            license=normalize_license(item.get("rights")),
            landing_url=_landing(item.get("guid")) or ITEM_PAGE + local_id,
            description=first_text(item.get("dcDescription"), _lang_values(item.get("dcDescriptionLangAware"))),
        )


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _label(obj: Any) -> Optional[str]:
    return first_text(obj.get("def"), obj.get("en")) if isinstance(obj, dict) else first_text(obj)


def _lang_values(lang_map: Any) -> list[str]:
    """Values of a language map ({"en": [...], "def": [...], "de": [...]}), preferred languages first."""
    if not isinstance(lang_map, dict):
        return []
    langs = [k for k in PREFERRED_LANGUAGES if k in lang_map] + sorted(k for k in lang_map if k not in
                                                                         PREFERRED_LANGUAGES)
    out: list[str] = []
    for lang in langs:
        out += text_list(lang_map[lang])
    return text_list(out)


def _is_uri(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _landing(guid: Any) -> Optional[str]:
    """The item page without the API's tracking query (utm_source=api...)."""
    if not isinstance(guid, str) or not _is_uri(guid):
        return None
    parts = urlsplit(guid)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
