"""Being a good citizen on other people's servers: per-host caps, backoff, circuit breaker (robots.txt: robots.py).

:class:`HostBook` is the bookkeeping (plain, single-threaded, clock passed in, so it is tested exactly). Two front
ends use it:

* :class:`LocalHostLimiter` — threads of one process (plain-function tests, a single-process run);
* :class:`artsim.download.ray_job.HostLimiterActorImpl` — the job-wide limiter: every worker of the job asks the same
  actor (one per host hash bucket), so caps hold across the cluster, not per process.

A grant is a *lease* owned by a *holder* (one per worker process). A lease has no expiry: it is returned by its
holder (after the connection's socket is closed), or taken back when the holder is known to be dead (the Ray front
end watches each holder's process). A fixed expiry would hand a slot to a second request while a starved but living
holder still had its connection open: exactly the over-cap that a loaded machine produces.

Waiters queue per host in arrival order (FIFO) and are granted one at a time: a release or a rate slot coming due
settles the head of the queue only, so a thousand waiters on one host cost one wake-up per grant, not a thousand.
"""
from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

# Failures that count towards the circuit breaker: the host is struggling or unreachable. 404 and friends are
# normal answers about one object and do not make a host "failing".
BREAKER_OUTCOMES = frozenset({"timeout", "connection", "server_error", "throttled"})


class LimiterUnavailable(RuntimeError):
    """The job-wide limiter cannot be reached. Not a property of any record: the shard fails (and Ray retries it)
    rather than committing statuses that no server returned."""


@dataclass
class Ticket:
    """One queued acquire: who asks (``holder``), when it gives up (monotonic), and the front end's waiter."""

    holder: Any
    give_up: float
    waiter: Any = None
    lease: Optional[int] = None  # a held connection asking to start its next request (rate slot only)


@dataclass
class HostState:
    active: int = 0
    next_slot: float = 0.0  # earliest time the next request may start (requests-per-second cap)
    not_before: float = 0.0  # Retry-After / backoff pause for the whole host
    consecutive_failures: int = 0
    open_until: float = 0.0  # circuit breaker: no requests before this time
    times_opened: int = 0
    leases: dict[int, Any] = field(default_factory=dict)  # lease id -> holder
    queue: deque = field(default_factory=deque)  # Tickets waiting, in arrival order
    requests: int = 0
    max_active: int = 0
    attempts: int = 0  # grant tries: what the limiter spends per request (a thundering herd shows here)
    reclaimed: int = 0  # leases taken back from dead holders
    min_interval: float = 0.0  # robots.txt Crawl-delay / Request-rate: seconds between request starts


class HostBook:
    """Per-host connection cap, request-rate cap, pauses, circuit breaker and FIFO wait queues.

    Not thread-safe: callers lock. ``submit`` queues a ticket; ``settle`` resolves what can be resolved now and says
    when to look again.
    """

    def __init__(self, connections: int, requests_per_second: Optional[float], breaker_failures: int,
                 breaker_cooldown_s: float):
        self.connections = connections
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0  # None: no rate cap
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.hosts: dict[str, HostState] = {}
        self.dead_holders: set = set()
        self._next_lease = 1

    def _state(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState()
        return state

    def try_acquire(self, host: str, now: float, holder: Any = None,
                    held: Optional[int] = None) -> tuple[Optional[int], Optional[float], Optional[str]]:
        """Grant now if the caps allow: (lease id, 0, None); otherwise (None, seconds to wait, reason), where the wait
        is None for "connections" (only a release or a dead holder frees a slot; nothing to time).

        ``held``: the lease of a kept-alive connection asking to start its next request. It already owns its
        connection slot, so only the rate cap and the pauses apply; (None, None, "reclaimed") when the lease is no
        longer valid (its holder was declared dead)."""
        state = self._state(host)
        state.attempts += 1
        if state.open_until > now:
            return None, state.open_until - now, "paused"
        if held is not None:
            if held not in state.leases:
                return None, None, "reclaimed"
        elif state.active >= self.connections:
            return None, None, "connections"
        wait = max(state.not_before, state.next_slot) - now
        if wait > 0:
            return None, wait, "rate"
        if held is not None:
            lease = held
        else:
            lease = self._next_lease
            self._next_lease += 1
            state.leases[lease] = holder
            state.active += 1
            state.max_active = max(state.max_active, state.active)
        state.requests += 1
        state.next_slot = max(state.next_slot, now) + max(self.interval, state.min_interval)
        return lease, 0.0, None

    def submit(self, host: str, ticket: Ticket) -> bool:
        """Queue a ticket; False (not queued) when its holder is known dead (a call that was still on its way)."""
        if ticket.holder is not None and ticket.holder in self.dead_holders:
            return False
        self._state(host).queue.append(ticket)
        return True

    def settle(self, host: str, now: float) -> tuple[list[tuple[Ticket, Optional[int], Optional[str]]],
                                                     Optional[float]]:
        """Resolve the host's queue as far as possible now.

        Returns (resolved tickets as (ticket, lease, None) or (ticket, None, "paused" | "queue_timeout"), the
        monotonic time at which to settle again, or None when only a release can change anything). Only the head of
        the queue is ever tried: FIFO, one grant at a time.
        """
        state = self._state(host)
        queue = state.queue
        done: list = []
        if queue and state.open_until > now:  # circuit breaker open: every waiter gives up (they do not wait 300 s)
            state.attempts += 1
            done.extend((t, None, "paused") for t in queue)
            queue.clear()
            return done, None
        if any(t.give_up <= now for t in queue):
            for t in [t for t in queue if t.give_up <= now]:
                done.append((t, None, "queue_timeout"))
            state.queue = queue = deque(t for t in queue if t.give_up > now)
        wake = None
        while queue:
            lease, wait, reason = self.try_acquire(host, now, queue[0].holder, queue[0].lease)
            if lease is not None:
                done.append((queue.popleft(), lease, None))
                continue
            if reason == "paused":
                done.extend((t, None, "paused") for t in queue)
                queue.clear()
                break
            if reason == "reclaimed":
                done.append((queue.popleft(), None, "reclaimed"))
                continue
            if reason == "connections":
                # A kept-alive connection asking to start needs no slot, and it may be the very connection whose
                # release the head is waiting for: let the first such ticket past (only the rate cap applies).
                index = next((i for i, t in enumerate(queue) if t.lease is not None), None)
                if index is not None:
                    ticket = queue[index]
                    lease, wait, reason = self.try_acquire(host, now, ticket.holder, ticket.lease)
                    if lease is not None or reason == "reclaimed":
                        del queue[index]
                        done.append((ticket, lease, reason))
                        continue
            if wait is not None:
                wake = now + wait
            break
        if queue:
            first_give_up = min(t.give_up for t in queue)
            wake = first_give_up if wake is None else min(wake, first_give_up)
        return done, wake

    def set_min_interval(self, host: str, seconds: float) -> None:
        """The host asks for at least ``seconds`` between request starts (robots.txt Crawl-delay); applies from the
        last granted request on."""
        state = self._state(host)
        if state.requests and seconds > state.min_interval:
            last_start = state.next_slot - max(self.interval, state.min_interval)
            state.next_slot = max(state.next_slot, last_start + seconds)
        state.min_interval = seconds

    def release(self, host: str, lease: int, outcome: str, now: float, pause_s: float = 0.0) -> None:
        """Return a slot. ``outcome``: ok, client_error, timeout, connection, server_error, throttled."""
        state = self._state(host)
        if state.leases.pop(lease, _MISSING) is not _MISSING:
            state.active -= 1
        self.record(host, outcome, now, pause_s)

    def record(self, host: str, outcome: str, now: float, pause_s: float = 0.0) -> None:
        """The outcome of a request whose connection stays open (keep-alive): pauses and the circuit breaker."""
        state = self._state(host)
        if pause_s > 0:
            state.not_before = max(state.not_before, now + pause_s)
        if outcome in BREAKER_OUTCOMES:
            state.consecutive_failures += 1
            if state.consecutive_failures >= self.breaker_failures:
                # Open (or re-open after a failed half-open trial): stop sending for a cooldown period.
                state.open_until = now + self.breaker_cooldown_s
                state.times_opened += 1
                state.consecutive_failures = self.breaker_failures - 1  # one trial after the cooldown
        elif outcome != "abandoned":
            state.consecutive_failures = 0

    def drop_holder(self, holder: Any) -> tuple[list[str], list[Ticket]]:
        """Take back every lease of a holder that is known to be dead, and take its waiting tickets out of the
        queues (a grant to a dead waiter would be a slot that nobody ever returns). Returns the hosts that got slots
        back and the removed tickets (the front end tells their waiters). Later tickets of that holder are refused
        (``submit``)."""
        self.dead_holders.add(holder)
        hosts, dropped = [], []
        for host, state in self.hosts.items():
            mine = [lease for lease, h in state.leases.items() if h == holder]
            for lease in mine:
                del state.leases[lease]
                state.active -= 1
                state.reclaimed += 1
            waiting = [t for t in state.queue if t.holder == holder]
            if waiting:
                state.queue = deque(t for t in state.queue if t.holder != holder)
                dropped.extend(waiting)
            if mine or waiting:
                hosts.append(host)
        return hosts, dropped

    def blocked_s(self, host: str, now: float) -> float:
        """Seconds until the host may be asked again (a Retry-After pause or an open circuit breaker), 0 if none."""
        state = self.hosts.get(host)
        if state is None:
            return 0.0
        return max(0.0, state.not_before - now, state.open_until - now)

    def blocked_hosts(self, now: float) -> dict[str, float]:
        return {host: s for host in self.hosts if (s := self.blocked_s(host, now)) > 0}

    def held_by(self, holder: Any) -> int:
        return sum(1 for s in self.hosts.values() for h in s.leases.values() if h == holder)

    def snapshot(self) -> dict:
        return {host: {"requests": s.requests, "max_active": s.max_active, "times_paused": s.times_opened,
                       "consecutive_failures": s.consecutive_failures, "attempts": s.attempts,
                       "reclaimed": s.reclaimed, "crawl_delay_s": s.min_interval}
                for host, s in self.hosts.items()}


_MISSING = object()


class LocalHostLimiter:
    """Thread-safe limiter for one process. Same interface as the Ray-backed client in ray_job.py."""

    def __init__(self, connections: int, requests_per_second: Optional[float], breaker_failures: int,
                 breaker_cooldown_s: float = 60.0):
        self.book = HostBook(connections, requests_per_second, breaker_failures, breaker_cooldown_s)
        self.rate_capped = bool(requests_per_second)  # every request start must ask (see Fetcher._request)
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}
        self.robots: dict[str, tuple[int, str]] = {}

    def acquire(self, host: str, deadline: float) -> tuple[Optional[int], Optional[str]]:
        """Block until a slot is granted or ``deadline`` (monotonic) passes; (lease, None) or (None, reason)."""
        return self._wait(host, Ticket(threading.get_ident(), deadline, [threading.Event(), None]))

    def start(self, host: str, lease: int, deadline: float) -> tuple[Optional[int], Optional[str]]:
        """A kept-alive connection's next request: wait for a rate slot (and any pause) under the lease it holds."""
        return self._wait(host, Ticket(threading.get_ident(), deadline, [threading.Event(), None], lease))

    def _wait(self, host: str, ticket: Ticket) -> tuple[Optional[int], Optional[str]]:
        with self._lock:
            self.book.submit(host, ticket)
            self._settle(host)
        ticket.waiter[0].wait()
        return ticket.waiter[1]

    def _settle(self, host: str) -> None:
        """Caller holds the lock. Resolve what can be resolved; arm one timer for the host's next due time."""
        now = time.monotonic()
        done, wake = self.book.settle(host, now)
        for ticket, lease, reason in done:
            ticket.waiter[1] = (lease, reason)
            ticket.waiter[0].set()
        old = self._timers.pop(host, None)
        if old is not None:
            old.cancel()
        if wake is not None:
            timer = threading.Timer(max(0.0, wake - now), self._on_timer, (host,))
            timer.daemon = True
            self._timers[host] = timer
            timer.start()

    def _on_timer(self, host: str) -> None:
        with self._lock:
            self._settle(host)

    def release(self, host: str, lease: int, outcome: str, pause_s: float = 0.0) -> None:
        with self._lock:
            self.book.release(host, lease, outcome, time.monotonic(), pause_s)
            self._settle(host)

    def record(self, host: str, outcome: str, pause_s: float = 0.0) -> None:
        with self._lock:
            self.book.record(host, outcome, time.monotonic(), pause_s)
            self._settle(host)

    def blocked_s(self, host: str) -> float:
        with self._lock:
            return self.book.blocked_s(host, time.monotonic())

    def get_robots(self, host_key: str) -> Optional[tuple]:
        with self._lock:
            return self.robots.get(host_key)

    def put_robots(self, host_key: str, value: tuple) -> None:
        with self._lock:
            self.robots[host_key] = value

    def set_min_interval(self, host: str, seconds: float) -> None:
        with self._lock:
            self.book.set_min_interval(host, seconds)

    def snapshot(self) -> dict:
        with self._lock:
            return self.book.snapshot()


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2**attempt)] (attempt from 0)."""
    cap = min(max_s, base_s * math.pow(2, attempt))
    return rng.uniform(0, cap)


def parse_retry_after(value: Optional[str], now_epoch: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None when absent/unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now_epoch = time.time() if now_epoch is None else now_epoch
    return max(0.0, when.timestamp() - now_epoch)


# X-Robots-Tag directives that withdraw consent for our use (AI/ML training and similarity indexing).
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noml", "noindex", "none"})


def x_robots_opt_out(header_values: list[str], agent: str) -> Optional[str]:
    """The opt-out directive that applies to ``agent`` (e.g. ``artsim``) in X-Robots-Tag values, or None.

    A value may be scoped to one crawler (``googlebot: noindex``); scoped values apply only when the name is ours.
    """
    agent = agent.lower()
    for value in header_values:
        scope = None
        for raw in value.split(","):
            token = raw.strip().lower()
            if ":" in token:
                head, rest = token.split(":", 1)
                if head.strip() not in OPT_OUT_DIRECTIVES and " " not in head.strip():
                    scope, token = head.strip(), rest.strip()
            if scope is not None and scope not in (agent, "*"):
                continue
            if token in OPT_OUT_DIRECTIVES:
                return token
    return None


def agent_token(user_agent: str) -> str:
    """The product token robots.txt groups match on: ``artsim/0.1 (+...)`` → ``artsim``."""
    return user_agent.split("/", 1)[0].split(" ", 1)[0].strip() or user_agent
