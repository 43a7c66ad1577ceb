"""Triplet mining strategies: one plain function each, ``(corpus, n, rng, taken, ...) -> list[Triplet]``.

Every strategy follows the same rules:
- the anchor, positive and negative are three different objects;
- the positive shares a *criterion* with the anchor (a term, a creator, near text, a curator's judgement) and the
  ``reason`` says which one;
- the negative never meets that criterion with the anchor (it lacks the shared term, has another known creator,
  is outside the anchor's text neighbourhood, was not annotated as similar);
- a triplet already in ``taken`` (an (anchor, positive, negative) id tuple) is not produced again; new ones are
  added to ``taken`` so strategies de-duplicate against each other;
- a strategy returns fewer than ``n`` triplets when the corpus has no more to give (after ``patience`` fruitless
  draws in a row): mining never loops forever on a small collection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from artsim.mine.corpus import TERM_FIELDS, MiningCorpus

from artsim.config import STRATEGIES  # noqa: E402  (one list: config validates names against it)
DEFAULT_PATIENCE = 2000  # fruitless draws in a row before a strategy counts as exhausted


@dataclass(frozen=True)
class Triplet:
    anchor_id: str
    positive_id: str
    negative_id: str
    reason: str
    strategy: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.anchor_id, self.positive_id, self.negative_id)


class _Collector:
    """Accepts new, valid triplets until ``n`` are in hand or the draws stop producing new ones."""

    def __init__(self, corpus: MiningCorpus, n: int, taken: Optional[set], strategy: str,
                 patience: int = DEFAULT_PATIENCE):
        self.corpus, self.n, self.strategy, self.patience = corpus, n, strategy, patience
        self.taken = taken if taken is not None else set()
        self.triplets: list[Triplet] = []
        self.misses = 0

    @property
    def finished(self) -> bool:
        return len(self.triplets) >= self.n or self.misses >= self.patience

    def miss(self) -> None:
        self.misses += 1

    def offer(self, a: int, p: int, neg: Optional[int], reason: str) -> bool:
        if neg is None or len({a, p, neg}) < 3:
            self.misses += 1
            return False
        ids = self.corpus.object_ids
        triplet = Triplet(ids[a], ids[p], ids[neg], reason, self.strategy)
        if triplet.key in self.taken:
            self.misses += 1
            return False
        self.taken.add(triplet.key)
        self.triplets.append(triplet)
        self.misses = 0
        return True


def _pick_other(members: np.ndarray, exclude: int, rng: np.random.Generator) -> Optional[int]:
    """A random member other than ``exclude`` (members are distinct)."""
    if len(members) < 2:
        return None
    while True:
        m = int(members[rng.integers(len(members))])
        if m != exclude:
            return m


# ---------------------------------------------------------------------------------------------------------------
# shared_terms: the same controlled-vocabulary term (subject, concept URI, object type, medium)


@dataclass
class _TermSampler:
    """For each object, the terms it could be an anchor for, weighted by IDF (rare terms say more)."""

    usable: np.ndarray  # bool per term: at least 2 members and not every object
    anchors: np.ndarray  # objects with at least one usable term
    object_choices: list  # object -> (term indices, probabilities) or None


def term_sampler(corpus: MiningCorpus, fields: Iterable[str] = tuple(TERM_FIELDS)) -> _TermSampler:
    fields = set(fields)
    n = corpus.size
    df = np.array([len(m) for m in corpus.term_members], dtype=np.float64)
    in_fields = np.array([t.field in fields for t in corpus.terms], dtype=bool)
    usable = (df >= 2) & (df < n) & in_fields if len(df) else np.zeros(0, bool)
    idf = np.log(n / np.maximum(df, 1.0)) if len(df) else df
    choices, anchors = [], []
    for i in range(n):
        terms = corpus.object_terms[i]
        terms = terms[usable[terms]] if len(terms) else terms
        if len(terms) == 0:
            choices.append(None)
            continue
        w = idf[terms]
        choices.append((terms, w / w.sum()))
        anchors.append(i)
    return _TermSampler(usable, np.array(anchors, dtype=np.int64), choices)


def negative_without_term(corpus: MiningCorpus, anchor: int, term: int, rng: np.random.Generator,
                          tries: int = 32) -> Optional[int]:
    """An object that lacks ``term``; preferably one sharing no term of the same field with the anchor.

    The strict preference keeps "shared subject: horses" from pairing with a negative that also shows the anchor's
    other subject "riders". When no such object turns up in ``tries`` draws, any object lacking the term will do.
    """
    field_name = corpus.terms[term].field
    fallback = None
    for _ in range(tries):
        c = int(rng.integers(corpus.size))
        if c == anchor or corpus.has_term(c, term):
            continue
        if not corpus.shares_field_term(anchor, c, field_name):
            return c
        if fallback is None:
            fallback = c
    if fallback is not None:
        return fallback
    # The term covers nearly everyone: draw from the exact complement.
    outside = np.setdiff1d(np.arange(corpus.size), corpus.term_members[term], assume_unique=True)
    outside = outside[outside != anchor]
    return int(outside[rng.integers(len(outside))]) if len(outside) else None


def mine_shared_terms(corpus: MiningCorpus, n: int, rng: np.random.Generator, taken: Optional[set] = None,
                      fields: Iterable[str] = tuple(TERM_FIELDS), patience: int = DEFAULT_PATIENCE) -> list[Triplet]:
    sampler = term_sampler(corpus, fields)
    out = _Collector(corpus, n, taken, "shared_terms", patience)
    if len(sampler.anchors) == 0:
        return []
    while not out.finished:
        a = int(sampler.anchors[rng.integers(len(sampler.anchors))])
        terms, probs = sampler.object_choices[a]
        t = int(terms[rng.choice(len(terms), p=probs)])
        p = _pick_other(corpus.term_members[t], a, rng)
        neg = negative_without_term(corpus, a, t, rng)
        out.offer(a, p, neg, corpus.terms[t].reason)
    return out.triplets


# ---------------------------------------------------------------------------------------------------------------
# same_creator (available, not the default: curators asked for subject and theme over artist and style)


def mine_same_creator(corpus: MiningCorpus, n: int, rng: np.random.Generator, taken: Optional[set] = None,
                      patience: int = DEFAULT_PATIENCE) -> list[Triplet]:
    out = _Collector(corpus, n, taken, "same_creator", patience)
    groups = {k: m for k, m in corpus.creator_members.items() if len(m) >= 2}
    known = np.array([i for i, c in enumerate(corpus.creators) if c is not None], dtype=np.int64)
    if not groups or len(corpus.creator_members) < 2:
        return []  # nobody with two works, or no second creator to take negatives from
    anchors = np.concatenate(list(groups.values()))
    while not out.finished:
        a = int(anchors[rng.integers(len(anchors))])
        creator = corpus.creators[a]
        p = _pick_other(groups[creator], a, rng)
        # Negatives must have a *known* other creator: an anonymous work might be by the same hand.
        neg = None
        for _ in range(32):
            c = int(known[rng.integers(len(known))])
            if corpus.creators[c] != creator:
                neg = c
                break
        out.offer(a, p, neg, f"same creator: {corpus.creator_labels[creator]}")
    return out.triplets


def nearest_neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k nearest rows of each row by inner product (self excluded; exact, FAISS).

    Rows with fewer than k other rows are padded with index -1 and similarity -inf.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    k_eff = max(1, min(k, n - 1))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    sims, idx = index.search(vectors, min(k_eff + 1, n))
    out_idx = np.full((n, k_eff), -1, dtype=np.int64)
    out_sim = np.full((n, k_eff), -np.inf, dtype=np.float32)
    for i in range(n):
        keep = (idx[i] != i) & (idx[i] >= 0)  # drop the row itself (usually first; duplicates can tie with it)
        row, srow = idx[i][keep][:k_eff], sims[i][keep][:k_eff]
        out_idx[i, :len(row)], out_sim[i, :len(row)] = row, srow
    return out_sim, out_idx


# ---------------------------------------------------------------------------------------------------------------
# text: positives among the text-nearest neighbours, negatives from far clusters (as LiviaAI did)


@dataclass
class TextNeighbourhoods:
    neighbours: np.ndarray  # (N, k) object indices, nearest first, self excluded (-1 where fewer exist)
    similarities: np.ndarray  # (N, k) cosine
    cluster_of: np.ndarray  # (N,) cluster label
    far_members: list  # cluster -> object indices in clusters far from it


def text_neighbourhoods(vectors: np.ndarray, k: int = 10, n_clusters: Optional[int] = None,
                        seed: int = 0) -> TextNeighbourhoods:
    """k-nearest neighbours (exact inner product in FAISS) and k-means clusters of L2-normalised text vectors."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    similarities, neighbours = nearest_neighbours(vectors, k)
    if n_clusters is None:
        n_clusters = int(min(256, max(2, round(math.sqrt(n / 4)))))
    n_clusters = min(n_clusters, max(1, n // 2))
    if n_clusters < 2:
        labels = np.zeros(n, dtype=np.int64)
        return TextNeighbourhoods(neighbours, similarities, labels, [np.arange(n)])
    km = faiss.Kmeans(d, n_clusters, niter=25, seed=seed, spherical=True, verbose=False)
    km.train(vectors)
    _, assign = km.index.search(vectors, 1)
    labels = assign[:, 0].astype(np.int64)
    centroids = km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)
    centroid_sims = centroids @ centroids.T
    far_members = []
    for c in range(n_clusters):
        others = [o for o in np.argsort(centroid_sims[c]) if o != c]
        far = others[:max(1, len(others) // 2)]  # the least similar half of the other clusters
        far_members.append(np.flatnonzero(np.isin(labels, far)))
    return TextNeighbourhoods(neighbours, similarities, labels, far_members)


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mine_text(corpus: MiningCorpus, n: int, rng: np.random.Generator, vectors: np.ndarray,
              taken: Optional[set] = None, neighbours: int = 10, min_similarity: float = 0.5,
              hoods: Optional[TextNeighbourhoods] = None, seed: int = 0,
              patience: int = DEFAULT_PATIENCE) -> list[Triplet]:
    """``vectors``: L2-normalised text embeddings aligned with the corpus (see artsim.text)."""
    out = _Collector(corpus, n, taken, "text", patience)
    if corpus.size < 3:
        return []
    hoods = hoods or text_neighbourhoods(vectors, neighbours, seed=seed)
    near_enough = (hoods.neighbours >= 0) & (hoods.similarities >= min_similarity)
    anchors = np.flatnonzero(near_enough.any(axis=1))
    if len(anchors) == 0:
        return []
    titles = corpus.titles or [""] * corpus.size
    while not out.finished:
        a = int(anchors[rng.integers(len(anchors))])
        options = np.flatnonzero(near_enough[a])
        j = int(options[rng.integers(len(options))])
        p, sim_p = int(hoods.neighbours[a, j]), float(hoods.similarities[a, j])
        far = hoods.far_members[hoods.cluster_of[a]] if len(hoods.far_members) > 1 else hoods.far_members[0]
        neg = None
        for _ in range(16):
            if len(far) == 0:
                break
            c = int(far[rng.integers(len(far))])
            # The positive criterion is "text-near": the negative must be neither a listed neighbour of the anchor
            # nor above the similarity threshold.
            if c != a and c not in hoods.neighbours[a] and float(vectors[a] @ vectors[c]) < min_similarity:
                neg = c
                break
        reason = f'similar text: "{_short(titles[a])}" ~ "{_short(titles[p])}" (cosine {sim_p:.2f})'
        out.offer(a, p, neg, reason)
    return out.triplets


# ---------------------------------------------------------------------------------------------------------------
# annotations: curators' judgements (Training the Archive grid annotations)


@dataclass
class Annotation:
    line: int  # CSV line number, for messages
    anchor: str
    similar: list[str]
    dissimilar: list[str] = field(default_factory=list)


def mine_annotations(corpus: MiningCorpus, annotations: Sequence[Annotation], n: int, rng: np.random.Generator,
                     taken: Optional[set] = None) -> tuple[list[Triplet], dict]:
    """Every annotated (anchor, similar, dissimilar) triplet, then random negatives for pairs annotated without one.

    Curated triplets are never dropped, even beyond ``n``: they are the most valuable data there is. Returns the
    triplets and counts of rows that could not be used (unknown object ids), which the report shows.
    """
    index = corpus.index_of()
    out = _Collector(corpus, max(n, 0), taken, "annotations")
    issues = {"rows": len(annotations), "unknown_ids": 0, "unknown_examples": []}
    similar_to: dict[int, set] = {}
    pairs_without_negative: list[tuple[int, int]] = []

    def lookup(oid: str) -> Optional[int]:
        i = index.get(oid)
        if i is None:
            issues["unknown_ids"] += 1
            if len(issues["unknown_examples"]) < 5:
                issues["unknown_examples"].append(oid)
        return i

    resolved = []
    for row in annotations:
        a = lookup(row.anchor)
        sims = [i for i in (lookup(s) for s in row.similar) if i is not None]
        dis = [i for i in (lookup(d) for d in row.dissimilar) if i is not None]
        if a is None:
            continue
        similar_to.setdefault(a, set()).update(sims)
        resolved.append((a, sims, dis))
    for a, sims, dis in resolved:
        for p in sims:
            for neg in dis:
                if neg not in similar_to.get(a, ()):  # a contradicting annotation is not a negative
                    out.n = max(out.n, len(out.triplets) + 1)  # explicit curator triplets always fit
                    out.offer(a, p, neg, "curator annotation")
            if not dis:
                pairs_without_negative.append((a, p))
    if pairs_without_negative and corpus.size >= 3:
        # At least one random negative per annotated pair, then more until the quota is met.
        target = max(out.n, len(out.triplets) + len(pairs_without_negative))
        out.n = target
        out.misses = 0
        rounds = 0
        while not out.finished:
            a, p = pairs_without_negative[rounds % len(pairs_without_negative)]
            rounds += 1
            neg = int(rng.integers(corpus.size))
            if neg in similar_to.get(a, ()):
                out.miss()
                continue
            out.offer(a, p, neg, "curator annotation (random negative)")
    return out.triplets, issues


# ---------------------------------------------------------------------------------------------------------------
# hard_negatives: metadata positives, negatives that the current image embedding finds close


def mine_hard_negatives(corpus: MiningCorpus, n: int, rng: np.random.Generator, vectors: np.ndarray,
                        vector_objects: np.ndarray, taken: Optional[set] = None, k: int = 20,
                        fields: Iterable[str] = tuple(TERM_FIELDS),
                        patience: int = DEFAULT_PATIENCE) -> list[Triplet]:
    """``vectors`` (M, d) L2-normalised image embeddings of corpus objects ``vector_objects`` (M corpus indices).

    The positive shares a term with the anchor (as in ``shared_terms``); the negative is one of the anchor's
    nearest images that lacks that term (and, where possible, every term of that field the anchor has): the
    current model confuses them, so they teach the most.
    """
    out = _Collector(corpus, n, taken, "hard_negatives", patience)
    if len(vectors) < 3:
        return []
    sampler = term_sampler(corpus, fields)
    sims, nbrs = nearest_neighbours(vectors, k)
    row_of = {int(o): r for r, o in enumerate(vector_objects)}
    anchors = np.array([int(o) for o in vector_objects if sampler.object_choices[int(o)] is not None], np.int64)
    if len(anchors) == 0:
        return []
    while not out.finished:
        a = int(anchors[rng.integers(len(anchors))])
        terms, probs = sampler.object_choices[a]
        t = int(terms[rng.choice(len(terms), p=probs)])
        p = _pick_other(corpus.term_members[t], a, rng)
        row = row_of[a]
        field_name = corpus.terms[t].field
        strict, loose = [], []
        for j, c in enumerate(nbrs[row]):
            if c < 0:
                break
            c = int(vector_objects[c])
            if c in (a, p) or corpus.has_term(c, t):
                continue
            (loose if corpus.shares_field_term(a, c, field_name) else strict).append((c, float(sims[row, j])))
        pool = strict or loose
        if not pool:
            out.miss()
            continue
        neg, sim = pool[int(rng.integers(min(3, len(pool))))]  # one of the three hardest, for variety
        out.offer(a, p, neg, f"{corpus.terms[t].reason}; hard negative (image cosine {sim:.2f})")
    return out.triplets
