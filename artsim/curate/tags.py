"""Tag recommendations: subjects and concepts that a work's nearest visual neighbours carry but it lacks.

Each candidate tag gets a similarity-weighted vote: ``score = sum(sim of neighbours carrying the tag) / sum(sim of
all k neighbours)`` (negative similarities count as 0), so 1.0 means "every neighbour has it" and the score does
not grow with k. A tag needs ``min_support`` neighbours: one look-alike carrying a rare tag is a coincidence, not a
recommendation. Every recommendation carries its evidence (which neighbours have the tag, with their titles and
similarities), so a curator can judge it instead of trusting a number.

``evaluate_tag_recommendation`` measures this honestly: it hides one known tag of each work in turn (leave-one-out),
recommends, and reports recall@k of the hidden tags next to a popularity baseline (the globally most frequent tags
the work lacks, not counting the work's own hidden copy).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from artsim.curate.common import checked_vectors, nearest_neighbors, norm_text, records_by_id
from artsim.errors import ArtsimError

Tag = tuple[str, str]  # (kind, key): kind "subject" (key = normalised text) or "concept" (key = URI)


def work_tags(record: Optional[dict]) -> dict[Tag, str]:
    """The tags of one record: (kind, key) -> display label (the first spelling seen)."""
    tags: dict[Tag, str] = {}
    if not record:
        return tags
    for subject in record.get("subjects") or []:
        key = norm_text(subject)
        if key:
            tags.setdefault(("subject", key), " ".join(str(subject).split()))
    for uri in record.get("concepts") or []:
        key = str(uri or "").strip()
        if key:
            tags.setdefault(("concept", key), key)
    return tags


def recommend_tags(records, vectors, vector_ids, *, k: int = 10, min_support: int = 2, top: int = 5,
                   min_score: float = 0.0, max_evidence: int = 5) -> list[dict]:
    """Recommend missing tags for every work that has a vector.

    Args:
        records: the canonical records (pyarrow table or list of dicts); subjects and concepts are the tags.
        vectors, vector_ids: (N, D) image embeddings and their object ids.
        k: neighbours consulted per work; min_support: neighbours that must carry a tag; top: tags kept per work;
        min_score: drop weaker tags; max_evidence: neighbours listed per tag.

    Returns one dict per work (in vector order) that got at least one tag::

        {"object_id": "met:1", "tags": [{"tag": "Portraits", "kind": "subject", "key": "portraits",
          "score": 0.61, "support": 4, "evidence": [{"object_id": "met:7", "title": "...", "score": 0.93}, ...]}]}
    """
    _check_params(k=k, min_support=min_support, top=top)
    matrix, ids = checked_vectors(vectors, vector_ids)
    meta = records_by_id(records)
    tags = [work_tags(meta.get(i)) for i in ids]
    sims, nbrs = nearest_neighbors(matrix, k)
    out = []
    for row, object_id in enumerate(ids):
        ranked = _rank_for_work(row, tags, sims, nbrs, min_support)
        kept = [(t, s, c) for t, s, c in ranked if s >= min_score][:top]
        if not kept:
            continue
        entries = []
        for tag, score, carriers in kept:
            evidence = [{"object_id": ids[j], "title": (meta.get(ids[j]) or {}).get("title"),
                         "score": round(float(sim), 4)} for j, sim in carriers[:max_evidence]]
            entries.append({"tag": _label(tag, carriers, tags), "kind": tag[0], "key": tag[1],
                            "score": round(float(score), 4), "support": len(carriers), "evidence": evidence})
        out.append({"object_id": object_id, "tags": entries})
    return out


def _rank_for_work(row: int, tags: list[dict], sims: np.ndarray, nbrs: np.ndarray, min_support: int):
    """[(tag, score, [(neighbour index, sim), ...])] for one work, best first; its own tags are excluded."""
    weights = np.maximum(sims[row], 0.0)
    total = float(weights.sum())
    if total <= 0:
        return []
    carriers: dict[Tag, list[tuple[int, float]]] = {}
    for j, sim, w in zip(nbrs[row], sims[row], weights):
        for tag in tags[int(j)]:
            if tag not in tags[row]:
                carriers.setdefault(tag, []).append((int(j), float(sim)))
    ranked = []
    for tag, who in carriers.items():
        if len(who) < min_support:
            continue
        score = sum(max(s, 0.0) for _, s in who) / total
        ranked.append((tag, score, sorted(who, key=lambda x: -x[1])))
    # ties broken by support, then by the tag itself so the output is deterministic
    ranked.sort(key=lambda x: (-x[1], -len(x[2]), x[0]))
    return ranked


def _label(tag: Tag, carriers, tags) -> str:
    return tags[carriers[0][0]].get(tag, tag[1])


def _check_params(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ArtsimError(f"tags.{name}: must be a positive integer, got {value!r}")


def evaluate_tag_recommendation(records, vectors, vector_ids, *, k: int = 10, min_support: int = 1, at: int = 5,
                                seed: int = 0, kind: Optional[str] = None) -> dict:
    """Hide one known tag per work and measure recall@``at`` of the hidden tags.

    Leave-one-out: every work with a vector and at least one tag (of ``kind`` if given: "subject" or "concept")
    in turn loses one tag chosen at random (seeded) and gets recommendations from its neighbours' tags (the
    neighbours keep theirs: they are known to the system). Reported next to the popularity baseline (the ``at``
    most frequent tags the work lacks) and the share of hidden tags that are recoverable at all (some other work
    still carries them — a tag only one work has can never be recommended from neighbours).
    """
    _check_params(k=k, min_support=min_support, at=at)
    if kind not in (None, "subject", "concept"):
        raise ArtsimError(f"tags.kind: expected 'subject', 'concept' or None, got {kind!r}")
    matrix, ids = checked_vectors(vectors, vector_ids)
    meta = records_by_id(records)
    rng = np.random.default_rng(seed)
    tags = [work_tags(meta.get(i)) for i in ids]
    hidden: dict[int, Tag] = {}
    for row, own in enumerate(tags):
        candidates = sorted(t for t in own if kind is None or t[0] == kind)
        if candidates:
            hidden[row] = candidates[int(rng.integers(len(candidates)))]
    if not hidden:
        raise ArtsimError("tags: no work with both a vector and a tag to hold out")

    popularity = Counter(t for own in tags for t in own)
    by_popularity = [t for t, _ in sorted(popularity.items(), key=lambda x: (-x[1], x[0]))]
    sims, nbrs = nearest_neighbors(matrix, k)
    hits = pop_hits = recoverable = 0
    for row, tag in hidden.items():
        full = tags[row]
        tags[row] = {t: v for t, v in full.items() if t != tag}  # hidden from this work only, for this round
        ranked = [t for t, _, _ in _rank_for_work(row, tags, sims, nbrs, min_support)][:at]
        tags[row] = full
        hits += tag in ranked
        # the baseline may not count the work's own copy of the hidden tag either
        counts_without = [(t, popularity[t] - (t == tag)) for t in by_popularity if t == tag or t not in full]
        baseline = [t for t, c in sorted(counts_without, key=lambda x: (-x[1], x[0])) if c > 0][:at]
        pop_hits += tag in baseline
        recoverable += popularity[tag] > 1
    n = len(hidden)
    return {"works_evaluated": n, "k": int(min(k, len(ids) - 1)), "min_support": min_support, "at": at,
            "kind": kind or "any", "distinct_tags": len(popularity),
            f"recall_at_{at}": round(hits / n, 4), f"popularity_recall_at_{at}": round(pop_hits / n, 4),
            "recoverable": round(recoverable / n, 4)}
