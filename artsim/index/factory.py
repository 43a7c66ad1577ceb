"""Choosing a FAISS index type from the collection's size, the vector dimension and a memory budget.

Rules (inner product on L2-normalised vectors, i.e. cosine similarity):

- **exact** ``IDMap2,Flat`` while N <= ``index.exact_max_vectors`` and the raw float32 vectors fit the budget:
  below about a million vectors a brute-force scan is fast enough and has perfect recall;
- **IVF + SQ8** ``IVF{nlist}_HNSW32,SQ8`` above that while one byte per dimension fits: ``nlist`` is the power of
  two nearest ``4 * sqrt(N)`` and the coarse quantizer is an HNSW graph, so assigning a query to lists stays cheap
  even with 65k lists;
- **IVF + PQ** ``IVF{nlist}_HNSW32,PQ{m}`` when even SQ8 does not fit: ``m`` one-byte sub-quantizers per vector,
  the largest divisor of the dimension that fits the budget (at most ``dim / 2``).

``index.factory`` overrides the choice with any FAISS factory string.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from artsim.errors import ConfigError

GIB = 1024 ** 3
ID_BYTES = 16  # int64 id in the index + its reverse map / direct map entry


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    kind: str  # "flat" | "ivf" | "hnsw" | "other": decides which search parameters can be tuned
    nlist: int = 0
    estimated_bytes: int = 0
    reason: str = ""


def nlist_for(n: int) -> int:
    """Power of two nearest 4 * sqrt(N), between 16 and 65536, and never more lists than N / 39 (k-means needs
    about 39 points per centroid to train)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    nlist = max(16, min(65536, nlist))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return nlist


def choose_factory(n: int, dim: int, memory_budget_gb: float, exact_max_vectors: int = 1_000_000) -> IndexPlan:
    if n < 1 or dim < 1:
        raise ConfigError("index", f"cannot index {n} vectors of dimension {dim}")
    budget = memory_budget_gb * GIB
    flat_bytes = n * (dim * 4 + ID_BYTES)
    if n <= exact_max_vectors and flat_bytes <= budget:
        return IndexPlan("IDMap2,Flat", "flat", 0, flat_bytes,
                         f"N={n} <= {exact_max_vectors} and {flat_bytes / GIB:.2f} GiB of float32 vectors fit the "
                         f"{memory_budget_gb} GiB budget: exact search")
    nlist = nlist_for(n)
    quantizer_bytes = nlist * (dim * 4 + 32 * 2 * 4)  # HNSW32 coarse quantizer: vectors + links
    sq8_bytes = n * (dim + ID_BYTES) + quantizer_bytes
    if sq8_bytes <= budget:
        return IndexPlan(f"IVF{nlist}_HNSW32,SQ8", "ivf", nlist, sq8_bytes,
                         f"N={n}: IVF with {nlist} lists; SQ8 codes ({sq8_bytes / GIB:.2f} GiB) fit the budget")
    for m in sorted((m for m in range(1, dim // 2 + 1) if dim % m == 0), reverse=True):
        pq_bytes = n * (m + ID_BYTES) + quantizer_bytes
        if pq_bytes <= budget:
            return IndexPlan(f"IVF{nlist}_HNSW32,PQ{m}", "ivf", nlist, pq_bytes,
                             f"N={n}: IVF with {nlist} lists; SQ8 needs {sq8_bytes / GIB:.2f} GiB, over the "
                             f"budget, so PQ with {m} bytes per vector ({pq_bytes / GIB:.2f} GiB)")
    raise ConfigError("index.memory_budget_gb",
                      f"{memory_budget_gb} GiB cannot hold {n} vectors even with 1-byte PQ codes; raise it")


def kind_of_factory(factory: str) -> str:
    """Which tunable knobs an index built from ``factory`` has (its main, last-but-codes component decides)."""
    parts = [p.strip() for p in factory.split(",")]
    if any(p.startswith("IVF") or p.startswith("IMI") for p in parts):
        return "ivf"
    if any(p.startswith("HNSW") for p in parts):
        return "hnsw"
    if parts and parts[-1] == "Flat" and all(p in ("IDMap", "IDMap2", "Flat") or p.startswith(("PCA", "OPQ", "L2norm"))
                                             for p in parts):
        return "flat"
    return "other"
