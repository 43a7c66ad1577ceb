"""A set of FAISS shards searched together: per-shard search in parallel threads, merged top-k.

Used by tuning (at build time) and by :class:`artsim.serving.ShardedIndex`. FAISS releases the GIL during a
search, so a thread per shard runs the shards concurrently on one machine.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import faiss
import numpy as np

from artsim.errors import IntegrityError
from artsim.serving.topk import EMPTY_ID, merge_topk


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def verify_file(path: str, sha256: str, size: Optional[int] = None, label: str = "") -> None:
    """Raise IntegrityError unless the file has the recorded size and sha256 (checked before FAISS parses it)."""
    label = label or path
    actual_size = os.path.getsize(path)
    if size is not None and actual_size != size:
        raise IntegrityError(f"{label}: {actual_size} bytes, manifest says {size} (truncated or replaced file)")
    digest = sha256_file(path)
    if digest != sha256:
        raise IntegrityError(f"{label}: sha256 {digest[:16]}… does not match the manifest's {sha256[:16]}… "
                             "(tampered or corrupted file; if the index is being rebuilt, open it again)")


def read_shard(path: str, mmap: bool = True) -> faiss.Index:
    """Load a verified shard; memory-mapped where FAISS supports it (flat codes, IVF lists)."""
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # an index type without mmap support: read it into memory
    return faiss.read_index(path)


def index_kind(index: faiss.Index) -> str:
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return "other"


def _unwrap(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def search_parameters(kind: str, params: dict, selector=None):
    """FAISS SearchParameters for one search; passed per call, so concurrent searches never share state."""
    if kind == "ivf":
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params.get("nprobe", 1))
        if params.get("efSearch"):
            q = faiss.SearchParametersHNSW()
            q.efSearch = int(params["efSearch"])
            p.quantizer_params = q
    elif kind == "hnsw":
        p = faiss.SearchParametersHNSW()
        if params.get("efSearch"):
            p.efSearch = int(params["efSearch"])
    else:
        p = faiss.SearchParameters()
    if selector is not None:
        p.sel = selector
    return p


class ShardSet:
    """The shards of one index. ``params`` are the tuned search parameters (nprobe, efSearch)."""

    def __init__(self, shards: list[faiss.Index], params: Optional[dict] = None):
        if not shards:
            raise IntegrityError("an index needs at least one shard")
        self.shards = shards
        self.kind = index_kind(shards[0])
        self.params = dict(params or {})
        self.dim = shards[0].d
        self.ntotal = sum(s.ntotal for s in shards)
        self.nlist = faiss.extract_index_ivf(shards[0]).nlist if self.kind == "ivf" else 0
        # Sized for concurrent callers (a server's request threads), not just one search: with len(shards) workers,
        # N concurrent requests would queue behind each other in this pool whatever the core count.
        workers = len(shards) * max(1, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers) if len(shards) > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def search(self, queries: np.ndarray, k: int, params: Optional[dict] = None,
               selector=None, shard_ids: Optional[list[int]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all shards (or ``shard_ids``); (scores, ids) of shape (nq, k), best first, -1 where none."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        use = dict(self.params)
        use.update(params or {})
        which = range(len(self.shards)) if shard_ids is None else shard_ids

        def one(i: int):
            shard = self.shards[i]
            kk = min(k, max(shard.ntotal, 1))
            return shard.search(queries, kk, params=search_parameters(self.kind, use, selector))

        if self._pool is not None:
            parts = list(self._pool.map(one, which))
        else:
            parts = [one(i) for i in which]
        if not parts:
            nq = len(queries)
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), EMPTY_ID, np.int64)
        return merge_topk(parts, k)

    def reconstruct(self, ids: np.ndarray, shard_of_ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ``ids`` (decoded codes for quantized indexes), from the shard each id lives in."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for shard_no in np.unique(shard_of_ids):
            rows = np.nonzero(shard_of_ids == shard_no)[0]
            out[rows] = self.shards[int(shard_no)].reconstruct_batch(np.ascontiguousarray(ids[rows]))
        return out
