"""The served indexes and their hot reload: one :class:`IndexSlot` per ``--index`` URI.

A slot holds the current :class:`~artsim.serving.ShardedIndex` version. A request takes a *lease* on the version
that is current when it starts and keeps using that object to the end, so a reload never changes an index under a
running request. Reload (:meth:`IndexRegistry.check_now`, run by a poller thread every ``poll_seconds``):

1. read ``manifest.json`` (small) and compute its identity (:func:`artsim.serving.manifest_version`);
2. when it differs from the current one, open the new version with ``ShardedIndex.open`` in the poller thread:
   every file is downloaded into the cache and its size + sha256 checked before anything parses it;
3. success: swap the slot's reference under a lock (requests that start afterwards see the new version); the old
   version is closed, and its cache files that no served version uses are removed, once its last lease ends;
4. failure (checksum mismatch, missing file, bad manifest, storage error): the new version is refused and logged,
   the old one keeps serving, and the refusal shows in ``GET /health``. A refused version is tried again after
   ``retry_refused_seconds`` (a shard upload may still have been in flight), and at once when its manifest changes.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from artsim.errors import ArtsimError
from artsim.rundir.index_manifest import MANIFEST
from artsim.serving.sharded_index import ShardedIndex, default_cache_dir, manifest_version
from artsim.storage import Storage, join

log = logging.getLogger("artsim.serve")


def index_name(uri: str) -> str:
    """``{index}`` in the URL: the index directory's name (the URI's last path component)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class _Version:
    index: ShardedIndex
    loaded_at: float
    leases: int = 0
    retired: bool = False
    extras: dict = field(default_factory=dict)  # per-version caches (tag records), dropped with the version


class IndexSlot:
    """One served URI: the current version, leases of in-flight requests, reload bookkeeping."""

    def __init__(self, uri: str, index: ShardedIndex, on_retired: Optional[Callable[[ShardedIndex], None]] = None):
        self.uri = uri.rstrip("/")
        self.name = index_name(self.uri)
        self._lock = threading.Lock()
        self._current = _Version(index, time.time())
        self._on_retired = on_retired
        self.last_checked: Optional[float] = None
        self.last_error: Optional[dict] = None  # {"version", "error", "at"} of the last refused version
        self.reloads = 0
        self._refused: dict[str, float] = {}  # version -> when it was refused

    @property
    def index(self) -> ShardedIndex:
        """The current version (for status; requests use :meth:`lease`)."""
        return self._current.index

    @contextmanager
    def lease(self) -> Iterator[tuple[ShardedIndex, dict]]:
        """The current version and its per-version cache, kept open until the ``with`` block ends."""
        with self._lock:
            version = self._current
            version.leases += 1
        try:
            yield version.index, version.extras
        finally:
            with self._lock:
                version.leases -= 1
                close = version.retired and version.leases == 0
            if close:
                self._close(version)

    def swap(self, new_index: ShardedIndex) -> ShardedIndex:
        """Make ``new_index`` current; the old version closes when its last lease ends. Returns the old index."""
        old_embedder = self.index.embedder_if_built
        if old_embedder is not None and (new_index.manifest.get("model") == self.index.manifest.get("model")):
            new_index.attach_embedder(old_embedder)  # same model: no rebuild on the first image query
        with self._lock:
            old = self._current
            self._current = _Version(new_index, time.time())
            old.retired = True
            close = old.leases == 0
            self.reloads += 1
            self.last_error = None
        if close:
            self._close(old)
        return old.index

    def in_flight(self) -> int:
        with self._lock:
            return self._current.leases

    def _close(self, version: _Version) -> None:
        version.index.close()
        version.extras.clear()
        if self._on_retired is not None:
            self._on_retired(version.index)

    def status(self) -> dict:
        with self._lock:
            version = self._current
        m = version.index.manifest
        model = m.get("model") or {}
        return {"name": self.name, "uri": self.uri, "version": version.index.version,
                "build_id": m.get("build_id"), "created": m.get("created"), "vectors": version.index.ntotal,
                "dim": version.index.dim, "factory": m.get("factory"),
                "model": model.get("backbone") or model.get("name") or m.get("embeddings") or None,
                "model_detail": model or None, "text_queries": version.index.supports_text(),
                "loaded_at": _iso(version.loaded_at), "last_checked": _iso(self.last_checked),
                "reloads": self.reloads, "last_refused": self.last_error}


class IndexRegistry:
    """The slots of one server, and the poller that reloads them."""

    def __init__(self, uris: list[str], cache_dir: Optional[str] = None, storage: Optional[Storage] = None,
                 poll_seconds: float = 60.0, retry_refused_seconds: Optional[float] = None,
                 opener: Callable[..., ShardedIndex] = ShardedIndex.open):
        if not uris:
            raise ArtsimError("serve: at least one --index is needed")
        if poll_seconds < 0:
            raise ArtsimError(f"serve: poll interval must be >= 0 seconds (0 disables reload), got {poll_seconds}")
        self.storage = storage or Storage()
        self.cache_dir = cache_dir
        self.poll_seconds = float(poll_seconds)
        self.retry_refused_seconds = (10 * self.poll_seconds if retry_refused_seconds is None
                                      else float(retry_refused_seconds))
        self._open = opener
        self.slots: dict[str, IndexSlot] = {}
        for uri in uris:
            name = index_name(uri)
            if name in self.slots:
                raise ArtsimError(f"serve: two --index URIs end in the same directory name {name!r} "
                                  f"({self.slots[name].uri}, {uri}); the URL path /v1/{name}/ must be unique")
            log.info("loading index %s from %s", name, uri)
            index = self._open(uri.rstrip("/"), cache_dir=cache_dir, storage=self.storage)
            self.slots[name] = IndexSlot(uri, index, on_retired=self._prune_cache)
            log.info("index %s: %d vectors, version %s", name, index.ntotal, index.version)
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None
        self._check_lock = threading.Lock()

    def slot(self, name: str) -> Optional[IndexSlot]:
        return self.slots.get(name)

    # -- reload ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.poll_seconds > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="artsim-index-poller", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.check_now()

    def check_now(self) -> dict[str, str]:
        """Check every slot for a new manifest once; returns {name: "unchanged" | "reloaded" | "refused" | ...}."""
        with self._check_lock:  # the poller and a caller never open the same version twice at once
            return {name: self._check_slot(slot) for name, slot in self.slots.items()}

    def _check_slot(self, slot: IndexSlot) -> str:
        slot.last_checked = time.time()
        try:
            manifest = self.storage.read_json(join(slot.uri, MANIFEST))
        except Exception as exc:  # storage hiccup or manifest removed: keep serving what we have
            log.warning("index %s: cannot read %s/%s (%s); still serving version %s", slot.name, slot.uri, MANIFEST,
                        exc, slot.index.version)
            return "unreadable"
        version = manifest_version(manifest) if isinstance(manifest, dict) else "invalid"
        if version == slot.index.version:
            return "unchanged"
        refused_at = self._refused_at(slot, version)
        if refused_at is not None and time.time() - refused_at < self.retry_refused_seconds:
            return "refused"
        log.info("index %s: new version %s found; verifying and loading it", slot.name, version)
        try:
            new_index = self._open(slot.uri, cache_dir=self.cache_dir, storage=self.storage)
        except Exception as exc:  # IntegrityError and any other failure: refuse it, keep the old one
            slot._refused[version] = time.time()
            slot.last_error = {"version": version, "error": f"{type(exc).__name__}: {exc}",
                               "at": _iso(time.time())}
            log.error("index %s: refused new version %s (%s: %s); still serving version %s", slot.name, version,
                      type(exc).__name__, exc, slot.index.version)
            return "refused"
        if new_index.version == slot.index.version:  # rewritten between our read and the open: nothing new
            new_index.close()
            return "unchanged"
        old = slot.swap(new_index)
        slot._refused.clear()
        log.info("index %s: now serving version %s (%d vectors; was %s)", slot.name, new_index.version,
                 new_index.ntotal, old.version)
        return "reloaded"

    @staticmethod
    def _refused_at(slot: IndexSlot, version: str) -> Optional[float]:
        return slot._refused.get(version)

    def _prune_cache(self, retired: ShardedIndex) -> None:
        """Remove a retired version's cache files that no current version reads (content-addressed files are
        shared between versions; on Linux a file another process still maps stays readable until it unmaps)."""
        cache = os.path.realpath(self.cache_dir or default_cache_dir())
        in_use = {os.path.realpath(p) for slot in self.slots.values() for p in slot.index.files()}
        for path in retired.files():
            real = os.path.realpath(path)
            if os.path.dirname(real) == cache and real not in in_use:
                try:
                    os.remove(real)
                except OSError:
                    pass

    def status(self) -> list[dict]:
        return [slot.status() for slot in self.slots.values()]

    def close(self) -> None:
        self.stop()
        for slot in self.slots.values():
            slot.index.close()


def _iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
