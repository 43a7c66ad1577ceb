"""Years from the free-text dates that collections publish ("ca. 1620", "1798–1801", "late 18th century",
"1850s", "500 B.C.", ISO timestamps), for the integer ``date_begin`` / ``date_end`` columns."""
from __future__ import annotations

import re
from typing import Optional

MIN_YEAR, MAX_YEAR = -100_000, 2_200  # outside this range a number is not a year of an artwork (and fits int32)

_ISO = re.compile(r"^(-?\d{1,4})-\d{2}-\d{2}(?:[T ][\d:.]+Z?)?$")
_CENTURY = re.compile(
    r"(?P<qual>early|mid|middle|late|first half of(?: the)?|second half of(?: the)?|1st half of(?: the)?|"
    r"2nd half of(?: the)?)?[\s-]*(?:the\s+)?(?:(?P<first>\d{1,2})(?:st|nd|rd|th)?\s*[-–—/]\s*)?(?P<num>\d{1,2})(?:st|nd|rd|th)[\s-]*(?:century|cent\.?|c\.)"
    r"(?P<era>\s*(?:b\.?\s?c\.?(?:e\.?)?|a\.?\s?d\.?|c\.?e\.?))?", re.I)
_DECADE = re.compile(r"(?<!\d)(\d{3})0s\b")
_YEAR = re.compile(r"(?<![\d.,/])(\d{1,4})(?![\d]|\s*(?:cm|mm|in\.?|x)\b)(?P<era>\s*(?:b\.?\s?c\.?(?:e\.?)?|a\.?\s?d\.?))?",
                   re.I)
_RANGE_SHORT = re.compile(r"(?<!\d)(\d{3,4})\s*[-–—/]\s*(\d{1,2})(?!\d)")


def parse_years(text) -> tuple[Optional[int], Optional[int]]:
    """(begin, end) years for a date string; (None, None) when it holds no year. Negative years are BC."""
    if text is None:
        return None, None
    if isinstance(text, int) and not isinstance(text, bool):
        return (text, text) if MIN_YEAR <= text <= MAX_YEAR else (None, None)
    s = str(text).strip()
    if not s:
        return None, None
    m = _ISO.match(s)
    if m:
        y = int(m.group(1))
        return (y, y) if MIN_YEAR <= y <= MAX_YEAR else (None, None)
    years: list[int] = []
    for m in _CENTURY.finditer(s):
        qualifier, bc = (m.group("qual") or "").lower(), _is_bc(m.group("era"))
        years.extend(_century_span(int(m.group("num")), qualifier, bc))
        if m.group("first"):  # "1st–2nd century": the span of both
            years.extend(_century_span(int(m.group("first")), "", bc))
    rest = _CENTURY.sub(" ", s)
    # "1550–60", "1550/60": the second number abbreviates the end year.
    for m in _RANGE_SHORT.finditer(rest):
        begin, short = int(m.group(1)), m.group(2)
        end = begin - begin % (10 ** len(short)) + int(short)
        if end >= begin:
            years.extend([begin, end])
    rest = _RANGE_SHORT.sub(" ", rest)
    for m in _DECADE.finditer(rest):
        decade = int(m.group(1)) * 10
        years.extend([decade, decade + 9])
    rest = _DECADE.sub(" ", rest)
    era_all_bc = _is_bc(rest) and not re.search(r"a\.?\s?d\.?", rest, re.I)
    for m in _YEAR.finditer(rest):
        value = int(m.group(1))
        if value < 100 and not m.group("era"):
            continue  # day or month numbers, "3 sheets"; bare two-digit years are too ambiguous
        if _is_bc(m.group("era")) or (era_all_bc and not m.group("era")):
            value = -value
        years.append(value)
    years = [y for y in years if MIN_YEAR <= y <= MAX_YEAR]
    if not years:
        return None, None
    begin, end = min(years), max(years)
    if re.match(r"^\s*(?:by|before|bis|vor)\b", s, re.I) and len(set(years)) == 1:
        return None, end
    if re.match(r"^\s*(?:after|nach|from|ab)\b", s, re.I) and len(set(years)) == 1:
        return begin, None
    return begin, end


def _is_bc(text: Optional[str]) -> bool:
    return bool(text) and bool(re.search(r"b\.?\s?c\.?|v\.\s?chr", text, re.I))


def _century_span(n: int, qualifier: str, bc: bool) -> list[int]:
    if bc:  # 3rd century BC = 300..201 BC
        start, stop = -(n * 100), -(n * 100) + 99
    else:  # 18th century = 1700..1799 (the usual museum reading, not 1701..1800)
        start, stop = (n - 1) * 100, (n - 1) * 100 + 99
    if qualifier == "early":
        stop = start + 33
    elif qualifier in ("mid", "middle"):
        start, stop = start + 33, start + 66
    elif qualifier == "late":
        start = start + 66
    elif qualifier.startswith(("first half", "1st half")):
        stop = start + 49
    elif qualifier.startswith(("second half", "2nd half")):
        start = start + 50
    return [start, stop]
