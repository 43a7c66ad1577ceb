"""Licence normalisation: one short code per licence, whatever way a collection writes it.

Codes: ``CC0``, ``PDM`` (Public Domain Mark), ``CC-BY-4.0``, ``CC-BY-SA-3.0``, ``CC-BY-NC-ND-4.0`` ... (Creative
Commons licence + version), and the rightsstatements.org codes (``InC``, ``InC-EDU``, ``NoC-NC``, ``CNE`` ...).
A value that matches none of these is returned as the source wrote it (stripped), so nothing is lost and the
download stage's ``allowed_licenses`` filter simply does not match it.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

_CC_URI = re.compile(
    r"creativecommons\.org/licen[cs]es/(?P<kind>by(?:-nc)?(?:-nd|-sa)?)/(?P<version>\d(?:\.\d)?)", re.I)
_CC_TEXT = re.compile(r"^cc[\s_-]*(?P<kind>by(?:[\s_-]*nc)?(?:[\s_-]*(?:nd|sa))?)(?:[\s_-]*(?P<version>\d(?:\.\d)?))?"
                      r"(?:\s+(?:international|unported|generic))?$", re.I)
_RS_URI = re.compile(r"rightsstatements\.org/(?:vocab|page)/(?P<code>[A-Za-z-]+)/", re.I)
_RS_CODES = ("InC", "InC-OW-EU", "InC-EDU", "InC-NC", "InC-RUU", "NoC-CR", "NoC-NC", "NoC-OKLR", "NoC-US", "CNE",
             "UND", "NKC")


def normalize_license(value) -> Optional[str]:
    """A licence code for a URI or text (see module doc); None for empty input."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        for v in value:
            code = normalize_license(v)
            if code:
                return code
        return None
    text = str(value).strip()
    if not text:
        return None
    low = text.lower()
    if "creativecommons.org/publicdomain/zero" in low or "public-domain/cc0" in low:
        return "CC0"
    if "creativecommons.org/publicdomain/mark" in low:
        return "PDM"
    m = _CC_URI.search(text)
    if m:
        return _cc_code(m.group("kind"), m.group("version"))
    m = _RS_URI.search(text)
    if m:
        return _rs_code(m.group("code")) or text
    compact = re.sub(r"[\s_]+", " ", low).strip(" .")
    if compact in ("cc0", "cc0 1.0", "cc-0", "cc zero", "cc0 1.0 universal", "cc0 (public domain)",
                   "creative commons zero", "public domain dedication"):
        return "CC0"
    if compact in ("pdm", "public domain", "public domain mark", "public domain mark 1.0", "pd", "gemeinfrei"):
        return "PDM"
    m = _CC_TEXT.match(compact)
    if m:
        return _cc_code(m.group("kind"), m.group("version"))
    code = _rs_code(text)
    if code:
        return code
    # "CC BY 4.0, Foto: Wien Museum", "CC BY 4.0 AT (ported)": a licence followed by a credit line or a port.
    head = re.split(r"[,;(]", compact, maxsplit=1)[0].strip()
    head = re.sub(r"\s+(?:at|de|nl|fr|es|it|dk|se|us|uk)$", "", head)
    if head and head != compact:
        code = normalize_license(head)
        if code != head:
            return code
    return text


def _cc_code(kind: str, version: Optional[str]) -> str:
    parts = [p for p in re.split(r"[\s_-]+", kind.upper()) if p]
    code = "CC-" + "-".join(parts)
    return f"{code}-{version}" if version else code


def _rs_code(code: str) -> Optional[str]:
    for known in _RS_CODES:
        if code.lower() == known.lower():
            return known
    return None


OPEN_LICENSES = ("CC0", "PDM", "CC-BY", "CC-BY-SA")  # families that allow reuse incl. commercial (prefix match)


def license_allowed(license_code: Optional[str], allowed: Iterable[str]) -> bool:
    """Whether a record's licence passes an ``allowed_licenses`` list. Empty list: everything passes.

    Each entry is normalised too, and matches a code exactly or as a family: ``CC-BY`` allows ``CC-BY-4.0`` (but
    not ``CC-BY-NC-4.0``); an entry ending in ``*`` is a plain prefix (``CC-BY*`` allows every CC-BY variant).
    """
    allowed = list(allowed)
    if not allowed:
        return True
    if not license_code:
        return False
    for entry in allowed:
        entry = str(entry).strip()
        if entry.endswith("*"):
            if license_code.lower().startswith(entry[:-1].lower()):
                return True
            continue
        want = normalize_license(entry) or ""
        if license_code == want:
            return True
        # Family match: the entry plus a version number ("CC-BY" vs "CC-BY-4.0").
        if re.fullmatch(re.escape(want) + r"-\d(?:\.\d)?", license_code):
            return True
    return False
