"""Plain-text progress lines and tables for people watching a job (stdout, so `ray job logs` shows them).

Text from data (titles, CSV headers, URLs, error messages that quote a source) is written by outsiders, so
everything printed here goes through :func:`printable`: control characters, escape sequences and bidirectional
overrides are shown escaped (``\x1b[2J``), never interpreted by the terminal. :func:`json_line` does the same for
JSON output while staying exact JSON.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Iterable, Sequence

# C0 and C1 controls, DEL, and the Unicode format characters that reorder or hide text (bidi embeddings, overrides
# and isolates, zero-width joiners, line/paragraph separators): none of them belongs in a terminal line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group(0)
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(value: Any) -> str:
    """``value`` as one terminal-safe line: control and format characters are written as escapes."""
    return _UNSAFE.sub(_escape, "" if value is None else str(value))


def json_line(obj: Any) -> str:
    """``obj`` as one line of JSON that decodes to exactly ``obj`` and holds no raw control or format character."""
    text = json.dumps(obj, default=str, ensure_ascii=False)
    # JSON syntax is ASCII, so these characters occur only inside strings, where \uXXXX means the same character.
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


class PrintableFormatter(logging.Formatter):
    """A logging formatter whose message line is :func:`printable` (a traceback, appended after it, stays as is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def say(message: str) -> None:
    # Written to the stream, not through print(): Ray Train patches print() in its workers to tee into a logger as
    # well, which printed every epoch line twice in the driver's log.
    sys.stdout.write(f"[artsim] {printable(message)}\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence], out=None) -> str:
    headers = [printable(h) for h in headers]
    rows = [[printable(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    text = "\n".join(lines)
    print(text, file=out or sys.stdout, flush=True)
    return text


class Progress:
    """Prints `done/total` with a rate at most every `interval` seconds."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items", interval: float = 5.0):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.done = 0
        self.start = self._last = time.perf_counter()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.interval or (self.total is not None and self.done >= self.total):
            self._last = now
            self._print(extra)

    def _print(self, extra: str = "") -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        say(f"{self.label}: {self.done}{total} {self.unit} ({self.done / elapsed:.1f}/s){' ' + extra if extra else ''}")

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)
