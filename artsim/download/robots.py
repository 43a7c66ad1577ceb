"""robots.txt as RFC 9309 says: which rules apply to us, how long a copy is good for, what an error means.

Parsing and matching are Protego's (``*`` and ``$`` patterns, longest match wins, Allow wins a tie); this module
decides the rest:

* **Groups.** RFC 9309 §2.2.1: a crawler obeys the group whose ``User-agent`` is its product token (compared
  case-insensitively), else the ``*`` group; all groups naming the same agent are merged. Protego alone would also
  apply a group named ``art`` to ``artsim`` (it looks for the name inside a full User-Agent header), so groups
  naming other agents are renamed before parsing to something that can never match our token. A trailing version
  (``artsim/1.0``) is accepted as our token: authors write it, and it cannot mean anyone else.
* **Fetch outcomes** (§2.3.1): 2xx → parse; 4xx → "unavailable", everything allowed; 5xx, 429 and network
  errors → "unreachable", everything *disallowed* for :data:`UNREACHABLE_RETRY_S`, then the file is asked for
  again. (429 is a 4xx, but a server that says "too many requests" has not said "no rules here".)
* **Size** (§2.5): only the first :data:`MAX_BYTES` are parsed (the RFC asks for at least 500 KiB); a longer file
  is cut at its last complete line, not thrown away.
* **Caching** (§2.4): a fetched copy is used for at most :data:`MAX_AGE_S` (24 h).
* **Crawl-delay / Request-rate** (not in the RFC, common and cheap to honour): the larger of the two becomes the
  host's minimum interval between request starts in the job-wide limiter, on top of
  ``download.per_host_requests_per_second``.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Optional

from protego import Protego

MAX_BYTES = 512 * 1024  # RFC 9309 §2.5: parse at least 500 KiB
MAX_AGE_S = 24 * 3600.0  # RFC 9309 §2.4: do not use a cached copy for more than 24 hours
UNREACHABLE_RETRY_S = 300.0  # how long an unreachable robots.txt keeps a host disallowed before we ask again
MAX_CRAWL_DELAY_S = 3600.0  # a larger (or non-numeric) Crawl-delay is taken as this: one request per hour

_USER_AGENT_LINE = re.compile(r"^(\s*user[-_ ]?agent\s*:\s*)([^#\r\n]*?)(\s*(?:#.*)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class RobotsFetch:
    """What fetching ``/robots.txt`` gave: HTTP status (0: no response at all), body text, epoch seconds."""

    status: int
    body: str
    fetched_at: float

    @property
    def unreachable(self) -> bool:
        return not (200 <= self.status < 300 or (400 <= self.status < 500 and self.status != 429))

    def expires_at(self) -> float:
        return self.fetched_at + (UNREACHABLE_RETRY_S if self.unreachable else MAX_AGE_S)

    def fresh(self, now: Optional[float] = None) -> bool:
        return (time.time() if now is None else now) < self.expires_at()

    def to_tuple(self) -> tuple:
        """The form kept in the job-wide limiter cache (plain values: it crosses processes)."""
        return (self.status, self.body, self.fetched_at)

    @staticmethod
    def from_tuple(value) -> Optional["RobotsFetch"]:
        if value is None or len(value) != 3:  # absent, or written by an older artsim
            return None
        return RobotsFetch(int(value[0]), str(value[1]), float(value[2]))


def truncate(body: bytes, limit: int = MAX_BYTES) -> bytes:
    """The first ``limit`` bytes, cut back to the last complete line (a half line could be a different rule)."""
    if len(body) <= limit:
        return body
    head = body[:limit]
    cut = max(head.rfind(b"\n"), head.rfind(b"\r"))
    return head[:cut + 1] if cut >= 0 else b""


def _only_our_groups(text: str, token: str) -> str:
    """Rename ``User-agent`` values that are neither ``*`` nor our token, so no prefix/substring match applies."""
    never = "~" + token + "~"  # longer than the token: never found inside it
    out = []
    for line in text.splitlines():
        m = _USER_AGENT_LINE.match(line)
        if m:
            value = m.group(2).strip()
            name = value.split("/", 1)[0].strip().lower()
            if value != "*":
                value = token if name == token else never
            line = m.group(1) + value + m.group(3)
        out.append(line)
    return "\n".join(out)


class RobotsRules:
    """The rules one origin's robots.txt gives one agent (product token)."""

    def __init__(self, fetch: RobotsFetch, token: str):
        self.fetch = fetch
        self.token = token.strip().lower()
        self._parser: Optional[Protego] = None
        if 200 <= fetch.status < 300 and fetch.body.strip():
            self._parser = Protego.parse(_only_our_groups(fetch.body, self.token))

    def allows(self, url: str) -> Optional[bool]:
        """True / False; None while the file is unreachable (RFC 9309: assume complete disallow)."""
        if self.fetch.unreachable:
            return None
        if self._parser is None:  # 4xx, or an empty file: no rules
            return True
        return self._parser.can_fetch(url, self.token)

    def min_interval_s(self) -> float:
        """Seconds between request starts that Crawl-delay / Request-rate ask of us (0 when they ask nothing)."""
        if self._parser is None:
            return 0.0
        values = []
        delay = self._parser.crawl_delay(self.token)
        if delay is not None:
            values.append(float(delay))
        rate = self._parser.request_rate(self.token)
        if rate is not None and rate.requests > 0:
            values.append(rate.seconds / rate.requests)
        interval = max(values, default=0.0)
        if not math.isfinite(interval) or interval < 0:
            return MAX_CRAWL_DELAY_S if interval > 0 else 0.0
        return min(interval, MAX_CRAWL_DELAY_S)
