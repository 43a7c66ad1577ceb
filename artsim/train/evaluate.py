"""recall@k of "related" items, with exact FAISS search (plain numpy/FAISS, no Ray).

For a query q with relevant set R(q) (other items that share its group: a creator, a subject tag, a curator's
pairing), recall@k(q) = |top-k(q) ∩ R(q)| / min(k, |R(q)|): 1.0 when every slot that could hold a relevant item
does. The query itself is never among its own results. Queries without relevant items are left out and counted.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np


def relevance_from_labels(labels: Sequence[Iterable[str]]) -> list[set[int]]:
    """Items are relevant to each other when they share at least one label (e.g. a subject tag)."""
    members: dict[str, list[int]] = defaultdict(list)
    label_sets = [set(x for x in (ls or []) if x) for ls in labels]
    for i, ls in enumerate(label_sets):
        for label in ls:
            members[label].append(i)
    out = []
    for i, ls in enumerate(label_sets):
        rel: set[int] = set()
        for label in ls:
            rel.update(members[label])
        rel.discard(i)
        out.append(rel)
    return out


def recall_at_k(vectors: np.ndarray, relevant: Sequence[set[int]], k: int = 10) -> dict:
    """Mean recall@k over queries that have relevant items; vectors are L2-normalised (cosine = inner product)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    queries = [i for i in range(n) if relevant[i]]
    if n < 2 or not queries:
        return {"recall": float("nan"), "queries": 0, "k": k}
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    k_search = min(k + 1, n)
    _, hits = index.search(vectors[queries], k_search)
    scores = []
    for q, row in zip(queries, hits):
        top = [int(h) for h in row if h != q and h >= 0][:k]
        rel = relevant[q]
        scores.append(len(rel.intersection(top)) / min(k, len(rel)))
    return {"recall": float(np.mean(scores)), "queries": len(queries), "k": k}


def chance_recall_at_k(relevant: Sequence[set[int]], k: int = 10) -> float:
    """Expected recall@k of a random ranking (the floor any model should beat)."""
    n = len(relevant)
    vals = [min(k, n - 1) * len(r) / (n - 1) / min(k, len(r)) for r in relevant if r]
    return float(np.mean(vals)) if vals else float("nan")
