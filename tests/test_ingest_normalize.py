"""Licence codes and year parsing (the values the download filter and date facets rely on)."""
from __future__ import annotations

import pytest

from artsim.ingest.dates import parse_years
from artsim.ingest.licenses import license_allowed, normalize_license


@pytest.mark.parametrize("value, code", [
    ("https://creativecommons.org/share-your-work/public-domain/cc0/", "CC0"),  # SMK
    ("http://creativecommons.org/publicdomain/zero/1.0/", "CC0"),  # Europeana
    ("http://creativecommons.org/publicdomain/mark/1.0/", "PDM"),
    ("http://creativecommons.org/licenses/by/4.0/", "CC-BY-4.0"),
    ("http://creativecommons.org/licenses/by-sa/3.0/nl/", "CC-BY-SA-3.0"),
    ("http://creativecommons.org/licenses/by-nc-nd/4.0/deed.en", "CC-BY-NC-ND-4.0"),
    ("http://rightsstatements.org/vocab/InC/1.0/", "InC"),
    ("http://rightsstatements.org/vocab/NoC-NC/1.0/", "NoC-NC"),
    ("CC BY 4.0", "CC-BY-4.0"),  # Wien Museum
    ("CC BY 4.0, Foto: Wien Museum", "CC-BY-4.0"),
    ("CC BY 4.0 AT, Foto: Birgit und Peter Kainz, Wien Museum", "CC-BY-4.0"),
    ("CC0 1.0", "CC0"), ("cc0", "CC0"), ("Public Domain", "PDM"), ("CC-BY-SA-4.0", "CC-BY-SA-4.0"),
    (["", "http://creativecommons.org/publicdomain/mark/1.0/"], "PDM"),
    ("All rights reserved", "All rights reserved"),  # unknown text is kept verbatim
    ("", None), (None, None),
])
def test_normalize_license(value, code):
    assert normalize_license(value) == code


def test_license_allowed():
    assert license_allowed("CC-BY-4.0", ["CC-BY"])  # family without version
    assert not license_allowed("CC-BY-NC-4.0", ["CC-BY"])  # a different licence, not a version of CC-BY
    assert license_allowed("CC-BY-NC-4.0", ["CC-BY*"])
    assert license_allowed("CC0", ["http://creativecommons.org/publicdomain/zero/1.0/"])  # entries normalised
    assert not license_allowed(None, ["CC0"]) and not license_allowed("InC", ["CC0", "PDM"])
    assert license_allowed(None, [])  # no filter


@pytest.mark.parametrize("text, years", [
    ("1688", (1688, 1688)), ("ca. 1620", (1620, 1620)), ("1798–1801", (1798, 1801)), ("1825 - 1893", (1825, 1893)),
    ("ca. 1733–34", (1733, 1734)), ("1550/60", (1550, 1560)), ("probably 1633–34", (1633, 1634)),
    ("by 1883", (None, 1883)), ("after 1700", (1700, None)), ("1494(?)", (1494, 1494)),
    ("18th century", (1700, 1799)), ("late 18th century", (1766, 1799)), ("mid-19th century", (1833, 1866)),
    ("second half of the 17th century", (1650, 1699)), ("18th–19th century", (1700, 1899)),
    ("1850s", (1850, 1859)), ("500 B.C.", (-500, -500)), ("ca. 2600–2500 B.C.", (-2600, -2500)),
    ("3rd century B.C.", (-300, -201)), ("1798-01-01T00:00:00.000Z", (1798, 1798)), ("Ca. 1800", (1800, 1800)),
    ("A.D. 1600-1800", (1600, 1800)), ("Udateret", (None, None)), ("", (None, None)), (None, (None, None)),
    (1787, (1787, 1787)), ("99999999999", (None, None)), ("10 3/4 in.", (None, None)),
])
def test_parse_years(text, years):
    assert parse_years(text) == years
