"""Plain-text progress lines and tables for people watching a job (stdout, so `ray job logs` shows them)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Sequence


def say(message: str) -> None:
    # Written to the stream, not through print(): Ray Train patches print() in its workers to tee into a logger as
    # well, which printed every epoch line twice in the driver's log.
    sys.stdout.write(f"[artsim] {message}\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence], out=None) -> str:
    rows = [["" if v is None else str(v) for v in row] for row in rows]
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
