"""Fetch one record's image: safe, polite, bounded; always returns a :class:`FetchResult`, never raises.

One :class:`Fetcher` serves many threads of one process. It needs a *limiter* (``acquire``/``release``/robots
cache), either :class:`~artsim.download.politeness.LocalHostLimiter` or the job-wide Ray client.
"""
from __future__ import annotations

import hashlib
import heapq
import http.client
import itertools
import random
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urljoin, urlsplit

from artsim.config import DownloadConfig, StorageConfig
from artsim.download.politeness import (
    BREAKER_OUTCOMES, LimiterUnavailable, agent_token, backoff_delay, parse_retry_after, x_robots_opt_out,
)
from artsim.download import robots
from artsim.download.resize import ImageRejected, process_image
from artsim.download.safety import Target, UnsafeURL, URLPolicy, open_connection

READ_CHUNK = 256 * 1024
KEEPALIVE_IDLE_S = 2.0  # an idle kept-alive connection is closed (and its slot returned) after this long
KEEPALIVE_MAX_S = 10.0  # no connection (and so no limiter lease) is kept longer: slots rotate between processes
NO_RETRY_HTTP = frozenset({400, 401, 403, 404, 405, 410, 451})


@dataclass
class FetchResult:
    object_id: str
    status: str
    http_status: Optional[int] = None
    error: Optional[str] = None
    url_final: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    sha256: Optional[str] = None  # of the bytes as downloaded (provenance / exact-duplicate detection)
    image: Optional[bytes] = None
    host: Optional[str] = None
    bytes_downloaded: int = 0
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    attempts: int = 0
    retryable: bool = False  # worth another try within this run (not stored)
    internal_error: Optional[str] = None  # status internal_error: the error's signature (not stored)


@dataclass
class _Response:
    """Outcome of one request (no redirects followed)."""

    kind: str  # body | redirect | http | opted_out | timeout | connection | too_large | paused
    http_status: Optional[int] = None
    body: bytes | bytearray = b""
    location: Optional[str] = None
    retry_after: Optional[float] = None
    error: Optional[str] = None
    headers: dict = field(default_factory=dict)
    reusable: bool = False  # the response was read to its end and the server keeps the connection open
    stale: bool = False  # a kept-alive connection failed before any response byte (the server had closed it)


class _Watchdog:
    """Enforces total deadlines: shuts a connection's socket down when its request runs out of time.

    Socket timeouts alone bound each recv(), so a server trickling one byte per second would never time out.
    One thread serves every request of the process.
    """

    def __init__(self):
        self._heap: list = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._live: dict[int, http.client.HTTPConnection] = {}
        self.fired: set[int] = set()
        threading.Thread(target=self._run, name="artsim-deadline-watchdog", daemon=True).start()

    def watch(self, deadline: float, conn) -> int:
        with self._cond:
            token = next(self._ids)
            self._live[token] = conn
            heapq.heappush(self._heap, (deadline, token))
            self._cond.notify()
            return token

    def done(self, token: int) -> bool:
        """Stop watching; True when the deadline fired (the request timed out)."""
        with self._cond:
            self._live.pop(token, None)
            if token in self.fired:
                self.fired.discard(token)
                return True
            return False

    def _run(self):
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                conn = self._live.pop(token, None)
                if conn is not None:
                    self.fired.add(token)
                    sock = getattr(conn, "raw_sock", None)
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass


@dataclass
class _Connection:
    """An open connection and the limiter lease that owns its slot: the lease is returned only after the socket
    is closed, so the job-wide connection cap counts open sockets, idle kept-alive ones included."""

    conn: http.client.HTTPConnection
    host: str
    key: tuple  # (scheme, host, port, pinned address): reused only for exactly these
    lease: int
    opened: float
    idle_since: float = 0.0
    requests: int = 0


class _ConnectionPool:
    """Idle kept-alive connections of one process, by (scheme, host, port, address).

    A connection is reused only when its previous response was read to the end, for the same scheme, host, port
    and *the address the current request's URL check just approved* (a DNS answer that changed opens a new
    connection to the newly checked address). Idle connections are closed after ``idle_s``, every connection after
    ``max_age_s``; closing returns the lease.
    """

    def __init__(self, limiter, idle_s: float = KEEPALIVE_IDLE_S, max_age_s: float = KEEPALIVE_MAX_S):
        self.limiter = limiter
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._idle: dict[tuple, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._reaper: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self.opened = 0
        self.reused = 0

    def take(self, key: tuple) -> Optional[_Connection]:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                pooled = idle.pop()  # the most recently used: the likeliest to be still open at the server
            if now - pooled.idle_since < self.idle_s and now - pooled.opened < self.max_age_s \
                    and _still_open(pooled.conn):
                self.reused += 1
                return pooled
            self.discard(pooled, "ok")

    def give(self, pooled: _Connection) -> None:
        pooled.idle_since = time.monotonic()
        if pooled.idle_since - pooled.opened >= self.max_age_s:
            self.discard(pooled, "ok")
            return
        with self._lock:
            self._idle.setdefault(pooled.key, []).append(pooled)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap_loop, name="artsim-keepalive-reaper", daemon=True)
                self._reaper.start()

    def discard(self, pooled: _Connection, outcome: str, pause_s: float = 0.0) -> None:
        """Close the socket, then return its slot (in this order: the cap counts open sockets)."""
        pooled.conn.close()
        self.limiter.release(pooled.host, pooled.lease, outcome, pause_s)

    def close_idle(self, older_than_s: float = 0.0) -> int:
        now = time.monotonic()
        with self._lock:
            stale, keep = [], {}
            for key, conns in self._idle.items():
                for c in conns:
                    expired = now - c.idle_since >= older_than_s or now - c.opened >= self.max_age_s
                    (stale if expired else keep.setdefault(key, [])).append(c)
            self._idle = keep
        for c in stale:
            self.discard(c, "ok")
        return len(stale)

    def _reap_loop(self) -> None:
        while True:
            self._wake.wait(self.idle_s / 4)
            self.close_idle(self.idle_s)


def _still_open(conn) -> bool:
    """A kept-alive socket with nothing to read: anything readable on an idle HTTP connection is the server's
    close (EOF) or garbage, and either way the connection is not reused."""
    sock = getattr(conn, "raw_sock", None)
    if sock is None or conn.sock is None:
        return False
    try:
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def iiif_rendition_url(service: str, size: int) -> str:
    """A server-side resized rendition: ``{service}/full/!N,N/0/default.jpg`` (IIIF Image API 2 and 3)."""
    base = service.strip().rstrip("/")
    if base.endswith("/info.json"):
        base = base[: -len("/info.json")]
    return f"{base}/full/!{size},{size}/0/default.jpg"


def check_expected_sha256(result: FetchResult, expected: Optional[str]) -> FetchResult:
    """An ok result whose downloaded bytes do not hash to the source's ``sha256`` becomes hash_mismatch (image
    dropped: it is not the file the source describes — changed, replaced or corrupted on the way)."""
    expected = (expected or "").strip().lower()
    if expected and result.status == "ok" and result.sha256 != expected:
        result.status = "hash_mismatch"
        result.error = f"sha256 of the downloaded bytes {result.sha256} != expected {expected}"
        result.image = result.width = result.height = None
    return result


def host_of(url: Optional[str]) -> Optional[str]:
    if not url:
        return None
    try:
        return urlsplit(url.strip()).hostname or None
    except ValueError:
        return None


class Fetcher:
    """Fetches records' images under one config. Thread-safe."""

    def __init__(self, config: DownloadConfig, limiter, storage_config: Optional[StorageConfig] = None,
                 policy: Optional[URLPolicy] = None, seed: Optional[int] = None, queue_timeout_s: float = 900.0,
                 image_slots: int = 1):
        self.cfg = config
        # How many images this process decodes/resizes/encodes/hashes at once; the other threads keep downloading.
        # A shard worker is a Ray actor with one CPU: 32 threads decoding together only time-slice that CPU and
        # evict each other's ~2 MB working sets from the cache. One at a time cost 8-9 % less CPU per image
        # (docs/download.md, "CPU per image"); the network stays fetch_threads-wide.
        self._image_slots = threading.BoundedSemaphore(max(1, image_slots))
        self.limiter = limiter
        self.policy = policy or URLPolicy(config.allow_private_addresses, config.allow_hosts,
                                          config.allow_local_files)
        self.storage_config = storage_config or StorageConfig()
        self.agent = agent_token(config.user_agent)
        self.allowed_licenses = {x.strip().lower() for x in config.allowed_licenses}
        self.queue_timeout_s = queue_timeout_s
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._watchdog = _Watchdog()
        self._robots: dict[str, robots.RobotsRules] = {}  # origin -> rules (process cache of the job-wide one)
        self._robots_locks: dict[str, threading.Lock] = {}
        self._robots_guard = threading.Lock()
        self._storage = None
        self.pool = _ConnectionPool(limiter)
        # Requests-per-second cap: with one, every request start asks the limiter (exact spacing needs that);
        # without (per_host_requests_per_second null), a kept-alive connection starts its next request without a
        # limiter round trip unless the host has a Crawl-delay or is paused (see docs/download.md).
        self._rate_capped_hosts: set[str] = set()
        self._failed_hosts: set[str] = set()  # hosts whose last reported outcome from here was a failure
        self.internal_errors: dict[str, str] = {}  # signature -> first traceback (see fetch_record)
        self._internal_lock = threading.Lock()

    # -- one record ----------------------------------------------------------------------------------------------
    def fetch_record(self, record: dict) -> FetchResult:
        object_id = record.get("object_id")
        try:
            result = self._fetch_record(record)
            return check_expected_sha256(result, record.get("sha256"))
        except LimiterUnavailable:
            raise  # the job's infrastructure failed, not this record: fail the shard, commit nothing
        except Exception as exc:
            # A bug must neither take the whole shard down nor pass as a failing museum: the record gets
            # internal_error (not retried within the run, not blamed on the host, fetched again by the next run),
            # and the traceback is kept once per distinct error for the stage to show and count.
            signature = self._note_internal_error(exc)
            return FetchResult(object_id, "internal_error", error=f"internal error: {type(exc).__name__}: {exc} "
                               f"[{signature}]", host=host_of(record.get("image_url") or record.get("iiif_service")),
                               internal_error=signature)

    def _note_internal_error(self, exc: BaseException) -> str:
        """A stable name for the error: its type and the innermost artsim frame (``TypeError at
        artsim/download/resize.py:88 in process_image``). The first traceback of each name is kept in
        ``internal_errors``; the stage shows each once per job (see shards.summarize and run_download)."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = ""
        for frame in reversed(frames):
            parts = frame.filename.replace("\\", "/").split("/")
            if "artsim" in parts:
                start = len(parts) - 1 - parts[::-1].index("artsim")
                where = f" at {'/'.join(parts[start:])}:{frame.lineno} in {frame.name}"
                break
        signature = f"{type(exc).__name__}{where}"
        with self._internal_lock:
            if signature not in self.internal_errors:
                self.internal_errors[signature] = "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__))
        return signature

    def _fetch_record(self, record: dict) -> FetchResult:
        object_id = record["object_id"]
        image_url = (record.get("image_url") or "").strip() or None
        service = (record.get("iiif_service") or "").strip() or None
        if self.allowed_licenses:
            license_ = (record.get("license") or "").strip()
            if license_.lower() not in self.allowed_licenses:
                return FetchResult(object_id, "license_excluded", error=f"license {license_ or 'unknown'!r} "
                                   "not in download.allowed_licenses", host=host_of(image_url or service))
        # A source's sha256 is of its file: fetch that file, not a server-side rendition, when both are known.
        expected_hash = bool((record.get("sha256") or "").strip())
        if service and self.cfg.iiif_rendition and not (expected_hash and image_url):
            result = self.fetch_url(object_id, iiif_rendition_url(service, self.cfg.image_size))
            if result.status == "ok" or not image_url or result.status in (
                    "opted_out", "robots_disallowed", "blocked_address"):
                return result
            # The rendition failed (server without the size API, broken service): fall back to the original.
            fallback = self.fetch_url(object_id, image_url)
            if fallback.status != "ok":
                fallback.error = f"{fallback.error} (IIIF rendition also failed: {result.error})"
            fallback.attempts += result.attempts
            return fallback
        if not image_url:
            return FetchResult(object_id, "invalid_url", error="record has no image_url or iiif_service")
        return self.fetch_url(object_id, image_url)

    def fetch_url(self, object_id: str, url: str) -> FetchResult:
        host = host_of(url)
        try:
            kind = self.policy.scheme_of(url)
        except UnsafeURL as exc:
            return FetchResult(object_id, exc.status, error=str(exc), url_final=url, host=host)
        if kind == "local":
            return self._fetch_local(object_id, url)
        result = self._fetch_http(object_id, url)
        result.host = result.host or host
        return result

    # -- HTTP with retries and redirects -------------------------------------------------------------------------
    def _fetch_http(self, object_id: str, url: str) -> FetchResult:
        attempt = 0
        while True:
            result, retry_after = self._attempt(object_id, url)
            result.attempts = attempt + 1
            retryable = result.status in ("http_error", "timeout") and result.retryable
            if not retryable or attempt >= self.cfg.retries:
                return result
            if retry_after is not None:
                if retry_after > self.cfg.backoff_max_s:
                    result.error = f"{result.error}; Retry-After {retry_after:.0f}s exceeds backoff_max_s"
                    return result
                delay = retry_after
            else:
                with self._rng_lock:
                    delay = backoff_delay(attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s, self._rng)
            time.sleep(delay)
            attempt += 1

    def _attempt(self, object_id: str, url: str) -> tuple[FetchResult, Optional[float]]:
        """One try: follow redirects (each target checked), robots, the final response → a result."""
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            try:
                target = self.policy.check(current)
            except UnsafeURL as exc:
                return FetchResult(object_id, exc.status, error=str(exc), url_final=current), None
            except OSError as exc:  # DNS failure: a dead domain is not fixed by retrying within seconds
                return FetchResult(object_id, "http_error", error=f"dns: {exc}", url_final=current), None
            if self.cfg.respect_robots_txt:
                verdict = self._robots_verdict(target)
                if verdict is False:
                    return FetchResult(object_id, "robots_disallowed", error="disallowed by robots.txt",
                                       url_final=current), None
                if verdict is None:
                    # Not retried within this run: the verdict is cached for robots.UNREACHABLE_RETRY_S, longer
                    # than any backoff. http_error is retryable, so --retry-failed asks again later.
                    return FetchResult(object_id, "http_error", error="robots.txt unreachable (RFC 9309: assume "
                                       "disallowed for now)", url_final=current), None
            response = self._request(target, want_body=True)
            if response.kind == "redirect":
                current = urljoin(current, response.location)
                continue
            return self._to_result(object_id, current, response), response.retry_after
        return FetchResult(object_id, "http_error", error=f"more than {self.cfg.max_redirects} redirects",
                           url_final=current), None

    def _to_result(self, object_id: str, url: str, response: _Response) -> FetchResult:
        res = FetchResult(object_id, "http_error", http_status=response.http_status, url_final=url,
                          error=response.error)
        res.retryable = False
        kind = response.kind
        if kind == "body":
            return self._finish(res, response.body)
        if kind == "opted_out":
            res.status = "opted_out"
        elif kind == "too_large":
            res.status = "too_large"
        elif kind == "timeout":
            res.status = "timeout"
            res.retryable = True
        elif kind == "connection":
            res.retryable = True
        elif kind == "paused":
            res.error = response.error
        elif kind == "http":
            code = response.http_status or 0
            if code in (404, 410):
                res.status = "not_found"
            res.retryable = code not in NO_RETRY_HTTP and (code >= 500 or code in (408, 425, 429))
            res.error = res.error or f"HTTP {code}"
        return res

    def _finish(self, res: FetchResult, body: bytes) -> FetchResult:
        res.bytes_downloaded = len(body)
        with self._image_slots:  # the connection is already back in the pool: no deadline or slot waits on this
            try:
                out = process_image(body, self.cfg.image_size, self.cfg.max_pixels, self.cfg.format,
                                    self.cfg.quality, self.cfg.min_width, self.cfg.min_height,
                                    self.cfg.max_aspect_ratio)
            except ImageRejected as exc:
                res.status, res.error = exc.status, str(exc)
                return res
            res.sha256 = hashlib.sha256(body).hexdigest()
        res.status, res.error = "ok", None
        res.image, res.width, res.height = out.data, out.width, out.height
        res.original_width, res.original_height = out.original_width, out.original_height
        return res

    # -- one request ---------------------------------------------------------------------------------------------
    def _request(self, target: Target, want_body: bool, max_bytes: Optional[int] = None,
                 path: Optional[str] = None, check_opt_out: bool = True, truncate: bool = False) -> _Response:
        """GET once (no redirects) on a connection that holds a limiter lease, under a total deadline.

        The connection is a kept-alive one of the same (scheme, host, port, checked address) when one is idle,
        else a new one (a lease first, then the connection). After an ``ok`` outcome with the response read to its
        end, the connection goes back to the pool with its lease; otherwise it is closed, then the lease returned
        with the outcome (circuit breaker, Retry-After pause).

        ``truncate``: a body over ``max_bytes`` is cut there (robots.txt) instead of refused as too_large."""
        max_bytes = self.cfg.max_bytes if max_bytes is None else max_bytes
        give_up = time.monotonic() + self.queue_timeout_s
        pooled = self.pool.take((target.scheme, target.host, target.port, target.address))
        if pooled is not None:
            refused = self._start_on(pooled, give_up)
            if refused is not None:
                return refused
            if pooled.lease is None:
                pooled = None  # the host is paused: the connection was closed; queue for a new slot below
        reused = pooled is not None
        if pooled is None:
            lease, why = self.limiter.acquire(target.host, give_up)
            if lease is None:
                return self._refused(target.host, why)
            pooled = _Connection(open_connection(target, self.cfg.timeout_s), target.host,
                                 (target.scheme, target.host, target.port, target.address), lease, time.monotonic())
            self.pool.opened += 1
        outcome, pause_s = "connection", 0.0
        response = _Response("connection", error="request did not complete")
        deadline = time.monotonic() + self.cfg.timeout_s
        token = self._watchdog.watch(deadline, pooled.conn)
        try:
            response = self._exchange(pooled.conn, target, path or target.path, want_body, max_bytes, deadline,
                                      check_opt_out, truncate)
            if response.stale and reused:
                # The server closed the idle connection as we sent (a keep-alive race, nothing was served): once
                # more on a new socket under the same slot, to the address this request's check approved.
                pooled.conn.close()
                self._watchdog.done(token)
                pooled.conn = open_connection(target, self.cfg.timeout_s)
                pooled.opened, pooled.requests = time.monotonic(), 0
                token = self._watchdog.watch(deadline, pooled.conn)
                response = self._exchange(pooled.conn, target, path or target.path, want_body, max_bytes,
                                          deadline, check_opt_out, truncate)
            code = response.http_status or 0
            if response.kind in ("timeout", "connection"):
                outcome = response.kind
            elif code in (429, 503):
                outcome = "throttled"
                pause_s = response.retry_after or 0.0
            elif code >= 500:
                outcome = "server_error"
            else:
                outcome = "ok"
        except Exception:
            outcome = "internal_error"  # a bug on our side: not a failure of the host (no circuit-breaker count)
            raise
        finally:
            fired = self._watchdog.done(token)
            if fired:
                outcome = "timeout"
            pooled.requests += 1
            if outcome == "ok" and response.reusable and self.cfg.keep_alive:
                if target.host in self._failed_hosts:  # tell the circuit breaker the host answers again
                    self._failed_hosts.discard(target.host)
                    self.limiter.record(target.host, "ok")
                self.pool.give(pooled)
            else:
                if outcome in BREAKER_OUTCOMES:
                    self._failed_hosts.add(target.host)
                elif outcome == "ok":
                    self._failed_hosts.discard(target.host)
                self.pool.discard(pooled, outcome, pause_s)
        if fired and response.kind != "timeout":
            response = _Response("timeout", error=f"no complete response within {self.cfg.timeout_s:g}s")
        return response

    def _start_on(self, pooled: _Connection, give_up: float) -> Optional[_Response]:
        """May a kept-alive connection start its next request now? None: yes (or, with ``pooled.lease`` set to
        None, not on this connection: it was closed and the request queues for a new slot). A response: the
        request ends with it (host paused by the circuit breaker, no rate slot in time)."""
        host = pooled.host
        if self.cfg.per_host_requests_per_second or host in self._rate_capped_hosts:
            # A requests-per-second cap is exact only if every start asks: one round trip, but no new connection.
            lease, why = self.limiter.start(host, pooled.lease, give_up)
            if lease is not None:
                return None
            if why == "reclaimed":  # the limiter took the slot back (it thought us dead): not ours any more
                pooled.conn.close()
                pooled.lease = None
                return None
            self.pool.discard(pooled, "abandoned")
            return self._refused(host, why)
        if self.limiter.blocked_s(host) > 0:
            # A Retry-After pause or an open circuit breaker that another request (maybe another process) saw:
            # give the slot back and queue like a new request, which waits out the pause or gives up.
            self.pool.discard(pooled, "abandoned")
            pooled.lease = None
        return None

    def _refused(self, host: str, why: Optional[str]) -> _Response:
        if why == "paused":
            return _Response("paused", error=f"host {host} paused by circuit breaker")
        return _Response("timeout", error=f"waited {self.queue_timeout_s:.0f}s for a connection slot")

    def release_connections(self) -> None:
        """Close every idle kept-alive connection and return its slot (end of a shard: an idle worker must not
        hold slots that other workers are waiting for)."""
        self.pool.close_idle(0.0)

    def _exchange(self, conn, target: Target, path: str, want_body: bool, max_bytes: int, deadline: float,
                  check_opt_out: bool, truncate: bool = False) -> _Response:
        started = False
        try:
            conn.putrequest("GET", path, skip_accept_encoding=True)
            conn.putheader("User-Agent", self.cfg.user_agent)
            conn.putheader("Accept", "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5")
            conn.putheader("Accept-Encoding", "identity")
            if not self.cfg.keep_alive:
                conn.putheader("Connection", "close")
            conn.endheaders()
            resp = conn.getresponse()
            started = True
            try:
                return self._read_response(conn, resp, want_body, max_bytes, deadline, check_opt_out, truncate)
            finally:
                resp.close()
        except (socket.timeout, TimeoutError):
            return _Response("timeout", error=f"no response within {self.cfg.timeout_s:g}s")
        except http.client.IncompleteRead as exc:
            return _Response("connection", error=f"truncated body: {len(exc.partial)} bytes then closed")
        except (http.client.HTTPException, OSError, ValueError) as exc:
            stale = not started and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                     BrokenPipeError, ConnectionAbortedError))
            return _Response("connection", error=f"{type(exc).__name__}: {exc}", stale=stale)

    def _read_response(self, conn, resp, want_body: bool, max_bytes: int, deadline: float,
                       check_opt_out: bool, truncate: bool = False) -> _Response:
        code = resp.status
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if 300 <= code < 400 and code != 304:
            location = resp.getheader("Location")
            if not location:
                return _Response("http", code, error=f"HTTP {code} without Location")
            return _Response("redirect", code, location=location.strip())
        if not 200 <= code < 300:
            retry_after = parse_retry_after(resp.getheader("Retry-After")) if code in (429, 503) else None
            return _Response("http", code, retry_after=retry_after, headers=headers)
        if check_opt_out and self.cfg.respect_x_robots_tag:
            directive = x_robots_opt_out(resp.headers.get_all("X-Robots-Tag") or [], self.agent)
            if directive:
                return _Response("opted_out", code, error=f"X-Robots-Tag: {directive}")
        if not want_body:
            return _Response("body", code, headers=headers)
        length = resp.getheader("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > max_bytes:
            if truncate:
                expected = None  # read up to the cap like a body without a length
            else:
                return _Response("too_large", code, error=f"Content-Length {expected} > max_bytes {max_bytes}")
        if expected is not None:
            # One read of the announced size (<= max_bytes, checked above) into one bytes object, which is then
            # hashed and decoded as is (BytesIO shares bytes): the body is never copied. The total deadline is the
            # watchdog's: it shuts the socket down, which ends this read short.
            conn.raw_sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = resp.read(expected)
            if len(data) < expected:
                return _Response("connection", code, error=f"truncated body: {len(data)} of {expected} bytes")
            return _Response("body", code, body=data, headers=headers,
                             reusable=resp.isclosed() and not resp.will_close)
        # Without a length: straight into one buffer (readinto), no per-chunk bytes objects and no join; it grows,
        # capped at max_bytes + 1 so an endless body is cut off.
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        total = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _Response("timeout", code, error=f"body not complete within {self.cfg.timeout_s:g}s")
                if resp.isclosed():  # http.client closes the response once Content-Length bytes are in
                    break
                if total == len(buf):
                    view.release()
                    buf.extend(bytes(min(len(buf), max_bytes + 1 - total)))
                    view = memoryview(buf)
                conn.raw_sock.settimeout(remaining)
                n = resp.readinto(view[total:min(len(buf), total + READ_CHUNK)])
                if not n:
                    break
                total += n
                if total > max_bytes:
                    if truncate:  # keep the byte over the cap: the caller then knows the last line may be cut
                        break
                    return _Response("too_large", code, error=f"body over max_bytes {max_bytes}")
        finally:
            view.release()
        del buf[total:]
        return _Response("body", code, body=buf, headers=headers, reusable=resp.isclosed() and not resp.will_close)

    # -- robots.txt ----------------------------------------------------------------------------------------------
    def _robots_verdict(self, target: Target) -> Optional[bool]:
        """True / False; None while the origin's robots.txt is unreachable (see artsim.download.robots)."""
        origin = f"{target.scheme}://{target.host}:{target.port}"
        rules = self._robots.get(origin)
        if rules is None or not rules.fetch.fresh():
            with self._robots_guard:
                lock = self._robots_locks.setdefault(origin, threading.Lock())
            with lock:  # one fetch per origin per process; others wait for it
                rules = self._robots.get(origin)
                if rules is None or not rules.fetch.fresh():
                    # The job-wide cache first (one fetch per job, unless processes race for the first copy).
                    fetched = robots.RobotsFetch.from_tuple(self.limiter.get_robots(origin))
                    if fetched is None or not fetched.fresh():
                        fetched = self._fetch_robots(target)
                        self.limiter.put_robots(origin, fetched.to_tuple())
                    rules = self._robots[origin] = robots.RobotsRules(fetched, self.agent)
                    interval = rules.min_interval_s()
                    if interval > 0:  # Crawl-delay / Request-rate: a per-host rate cap, job-wide
                        self._rate_capped_hosts.add(target.host)  # so every start on a kept connection asks
                        self.limiter.set_min_interval(target.host, interval)
        return rules.allows(target.url)

    def _fetch_robots(self, target: Target) -> robots.RobotsFetch:
        """Fetch an origin's robots.txt (redirects followed, each hop checked); status 0 when unreachable."""
        url = f"{target.scheme}://{target.host}:{target.port}/robots.txt"
        status, body = 0, b""
        for _hop in range(self.cfg.max_redirects + 1):
            try:
                hop_target = self.policy.check(url)
            except UnsafeURL:
                status = 404  # a redirect to a forbidden place: no usable rules (RFC 9309: like 4xx)
                break
            except OSError:
                break  # DNS failure: unreachable
            response = self._request(hop_target, want_body=True, max_bytes=robots.MAX_BYTES,
                                     check_opt_out=False, truncate=True)
            if response.kind == "redirect":
                url = urljoin(url, response.location)
                continue
            if response.kind in ("body", "http"):
                status = response.http_status or 0
                body = robots.truncate(bytes(response.body))
            break
        else:
            status = 404  # more redirects than we follow: RFC 9309 lets us take that as unavailable
        text = body.decode("utf-8", errors="replace").lstrip("\ufeff")
        return robots.RobotsFetch(status, text, time.time())

    # -- local files and S3 --------------------------------------------------------------------------------------
    def _fetch_local(self, object_id: str, uri: str) -> FetchResult:
        from artsim.storage import Storage

        if self._storage is None:
            self._storage = Storage(self.storage_config)
        res = FetchResult(object_id, "http_error", url_final=uri, host=None)
        try:
            fs, path = self._storage.fs(uri)
            with fs.open(path, "rb") as f:
                body = f.read(self.cfg.max_bytes + 1)
        except FileNotFoundError:
            res.status, res.error = "not_found", "no such file"
            return res
        except (OSError, ValueError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            return res
        if len(body) > self.cfg.max_bytes:
            res.status, res.error = "too_large", f"file over max_bytes {self.cfg.max_bytes}"
            return res
        res.attempts = 1
        return self._finish(res, body)
