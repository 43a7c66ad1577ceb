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

import re
from collections import Counter
from typing import Iterable, Optional

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
                   min_score: float = 0.0, max_evidence: int = 5, text_encoder=None, text_weight: float = 0.5,
                   only: Optional[Iterable[str]] = None) -> list[dict]:
    """Recommend missing tags for every work that has a vector.

    Args:
        records: the canonical records (pyarrow table or list of dicts); subjects and concepts are the tags.
        vectors, vector_ids: (N, D) image embeddings and their object ids.
        k: neighbours consulted per work; min_support: neighbours that must carry a tag; top: tags kept per work;
        min_score: drop weaker tags; max_evidence: neighbours listed per tag.

        text_encoder: an ``artsim.text`` sentence encoder (``load_sentence_encoder()``); with it, a second signal:
        cosine between each subject's label and the work's metadata text (``tag_text``: title, type, medium,
        culture, description; never its tags), ensembled as ``text_weight * text + (1 - text_weight) * visual``.
        only: object ids to suggest for (all works' tags and vectors still vote); default every work.

    Returns one dict per work (in vector order) that got at least one tag::

        {"object_id": "met:1", "tags": [{"tag": "Portraits", "kind": "subject", "key": "portraits",
          "score": 0.61, "visual": 0.61, "text": null, "signal": "visual", "support": 4,
          "evidence": [{"object_id": "met:7", "title": "...", "score": 0.93}, ...], "words": []}]}

    ``evidence`` lists the neighbours that carry the tag (visual), ``words`` the words of the work's metadata
    closest to the tag's label (text, with their cosines); ``signal`` says which contributed more.
    """
    _check_params(k=k, min_support=min_support, top=top)
    if not 0.0 <= float(text_weight) <= 1.0:
        raise ArtsimError(f"tags.text_weight: must be between 0 and 1, got {text_weight!r}")
    matrix, ids = checked_vectors(vectors, vector_ids)
    meta = records_by_id(records)
    tags = [work_tags(meta.get(i)) for i in ids]
    sims, nbrs = nearest_neighbors(matrix, k)
    wanted = None if only is None else set(only)
    rows = range(len(ids)) if wanted is None else [r for r, i in enumerate(ids) if i in wanted]
    text = None
    if text_encoder is not None and text_weight > 0:
        text = TextSignal(text_encoder, tags)
        text.encode_works([tag_text(meta.get(ids[r]) or {}) for r in rows])
    out = []
    for position, row in enumerate(rows):
        visual = {t: (s, c) for t, s, c in _rank_for_work(row, tags, sims, nbrs, min_support)}
        textual = text.rank(position, tags[row]) if text is not None else {}
        weight = text_weight if text is not None else 0.0
        combined = []
        for tag in set(visual) | set(textual):
            v = visual.get(tag, (0.0, []))[0]
            t = textual.get(tag)
            combined.append((tag, weight * (t or 0.0) + (1 - weight) * v, v if tag in visual else None, t))
        combined.sort(key=lambda x: (-x[1], x[0]))
        kept = [c for c in combined if c[1] >= min_score and c[1] > 0][:top]
        if not kept:
            continue
        entries = []
        for tag, score, v, t in kept:
            carriers = visual.get(tag, (0.0, []))[1]
            evidence = [{"object_id": ids[j], "title": (meta.get(ids[j]) or {}).get("title"),
                         "score": round(float(sim), 4)} for j, sim in carriers[:max_evidence]]
            words = text.words(position, tag) if (text is not None and t is not None) else []
            signal = "text" if weight * (t or 0.0) > (1 - weight) * (v or 0.0) else "visual"
            entries.append({"tag": _label(tag, carriers, tags) if carriers else text.label(tag), "kind": tag[0],
                            "key": tag[1], "score": round(float(score), 4),
                            "visual": None if v is None else round(float(v), 4),
                            "text": None if t is None else round(float(t), 4), "signal": signal,
                            "support": len(carriers), "evidence": evidence, "words": words})
        out.append({"object_id": ids[row], "tags": entries})
    return out


_STOPWORDS = frozenset("""a an and the of in on at to for with from by or as is are was be this that its it his her
their de la le du des et en und der die das von""".split())
_WORD = re.compile(r"[^\W\d_]{3,}")


def tag_text(record: dict) -> str:
    """The metadata a tag's label is compared with: title, object type, medium, culture, description — not the
    record's subjects or concepts (they are the tags; a hidden tag must not leak into its own evidence) and not
    the creator (a name says nothing about subject)."""
    parts = [" ".join(str(record.get(f)).split()) for f in ("title", "object_type", "medium", "culture")
             if record.get(f) and str(record.get(f)).strip()]
    if record.get("description") and str(record["description"]).strip():
        parts.append(" ".join(str(record["description"]).split())[:500])
    return ". ".join(parts)


class TextSignal:
    """Text similarity between subject labels and works' metadata, with the words behind it.

    Labels are the distinct subjects known anywhere (``tags``: every work's tags as the system sees them); each
    label, each work's text and each distinct word of those texts is embedded once. A work's text score for a
    label is the cosine of the two (negative counts 0); ``candidates`` best labels per work are kept.
    """

    def __init__(self, encoder, tags: list[dict], candidates: int = 50):
        labels: dict[Tag, str] = {}
        for own in tags:
            for tag, label in own.items():
                if tag[0] == "subject":
                    labels.setdefault(tag, label)
        self.encoder, self.candidates = encoder, candidates
        self.tags = sorted(labels)
        self.tag_index = {t: j for j, t in enumerate(self.tags)}
        self.labels = labels
        self.label_vectors = encoder([labels[t] for t in self.tags]) if self.tags else np.zeros((0, 1), np.float32)
        self.scores = np.zeros((0, 0), np.float32)

    def label(self, tag: Tag) -> str:
        return self.labels.get(tag, tag[1])

    def encode_works(self, texts: list[str]) -> None:
        self.work_words = [sorted({w.casefold() for w in _WORD.findall(t)} - _STOPWORDS) for t in texts]
        vocabulary = sorted({w for words in self.work_words for w in words})
        self.word_index = {w: i for i, w in enumerate(vocabulary)}
        self.word_vectors = self.encoder(vocabulary) if vocabulary else np.zeros((0, 1), np.float32)
        has_text = np.array([bool(t.strip()) for t in texts])
        vectors = self.encoder([t if t.strip() else "-" for t in texts]) if texts else np.zeros((0, 1), np.float32)
        if self.tags and len(texts):
            self.scores = np.maximum(vectors @ self.label_vectors.T, 0.0) * has_text[:, None]
        else:
            self.scores = np.zeros((len(texts), len(self.tags)), np.float32)

    def rank(self, position: int, own: dict) -> dict[Tag, float]:
        if not self.tags:
            return {}
        row = self.scores[position]
        order = np.argsort(-row, kind="stable")
        out = {}
        for j in order:
            tag = self.tags[int(j)]
            if tag in own:
                continue
            if row[j] <= 0 or len(out) >= self.candidates:
                break
            out[tag] = float(row[j])
        return out

    def words(self, position: int, tag: Tag, n: int = 3) -> list[dict]:
        words = self.work_words[position]
        if not words or tag not in self.labels:
            return []
        label = self.label_vectors[self.tag_index[tag]]
        sims = self.word_vectors[[self.word_index[w] for w in words]] @ label
        best = np.argsort(-sims, kind="stable")[:n]
        return [{"word": words[int(b)], "score": round(float(sims[b]), 4)} for b in best if sims[b] > 0]


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


def evaluate_tag_signals(records, vectors, vector_ids, *, text_encoder=None, hide: float = 0.3, at: int = 5,
                         k: int = 10, min_support: int = 1, text_weight: float = 0.5, seed: int = 0,
                         kind: Optional[str] = "subject", max_works: Optional[int] = None) -> dict:
    """Hide a share of the known tags and measure precision@``at`` / recall@``at`` of each signal.

    A seeded random ``hide`` share of every (work, tag) pair (of ``kind``; at least one per work that has two or
    more) is removed from the data; the system sees only what remains (a neighbour's hidden tag does not vote, a
    tag hidden everywhere is unknown). For each work with a hidden tag, each signal ranks the tags the work does
    not visibly carry: **visual** (similarity-weighted neighbour vote), **text** (label vs metadata cosine; needs
    ``text_encoder``), **ensemble** (``text_weight`` mix, as ``recommend_tags``) and the **popularity** baseline
    (most frequent visible tags). precision@at = hits / at, recall@at = hits / hidden tags of the work, averaged
    over works. ``max_works`` evaluates a seeded subset of the works with hidden tags (the text model costs ~5 ms
    a work on a CPU); every work still votes.
    """
    _check_params(k=k, min_support=min_support, at=at)
    if not 0.0 < float(hide) < 1.0:
        raise ArtsimError(f"tags.hide: must be between 0 and 1 (exclusive), got {hide!r}")
    if kind not in (None, "subject", "concept"):
        raise ArtsimError(f"tags.kind: expected 'subject', 'concept' or None, got {kind!r}")
    matrix, ids = checked_vectors(vectors, vector_ids)
    meta = records_by_id(records)
    rng = np.random.default_rng(seed)
    full = [work_tags(meta.get(i)) for i in ids]
    visible, hidden = [], {}
    for row, own in enumerate(full):
        candidates = sorted(t for t in own if kind is None or t[0] == kind)
        n_hide = int(round(hide * len(candidates)))
        if len(candidates) >= 2:
            n_hide = max(1, min(n_hide, len(candidates) - 1))  # keep one visible: the work is not untagged
        elif candidates and rng.random() < hide:
            n_hide = 1
        chosen = set(rng.choice(len(candidates), n_hide, replace=False).tolist()) if n_hide else set()
        gone = {candidates[c] for c in chosen}
        if gone:
            hidden[row] = gone
        visible.append({t: v for t, v in own.items() if t not in gone})
    if not hidden:
        raise ArtsimError("tags: no work with both a vector and a tag to hide")
    rows = sorted(hidden)
    if max_works is not None and len(rows) > max_works:
        rows = sorted(rng.choice(rows, max_works, replace=False).tolist())
    popularity = Counter(t for own in visible for t in own if kind is None or t[0] == kind)
    by_popularity = [t for t, _ in sorted(popularity.items(), key=lambda x: (-x[1], x[0]))]
    sims, nbrs = nearest_neighbors(matrix, k)
    text = None
    if text_encoder is not None:
        text = TextSignal(text_encoder, visible, candidates=max(at * 4, 20))
        text.encode_works([tag_text(meta.get(ids[r]) or {}) for r in rows])

    def keep(tag):
        return kind is None or tag[0] == kind

    sums: dict[str, list[float]] = {}
    for position, row in enumerate(rows):
        visual = {t: s for t, s, _ in _rank_for_work(row, visible, sims, nbrs, min_support) if keep(t)}
        ranked = {"visual": _top(visual, at),
                  "popularity": [t for t in by_popularity if t not in visible[row]][:at]}
        if text is not None:
            textual = {t: s for t, s in text.rank(position, visible[row]).items() if keep(t)}
            ranked["text"] = _top(textual, at)
            mixed = {t: text_weight * textual.get(t, 0.0) + (1 - text_weight) * visual.get(t, 0.0)
                     for t in set(visual) | set(textual)}
            ranked["ensemble"] = _top(mixed, at)
        for name, top_tags in ranked.items():
            hits = len(hidden[row] & set(top_tags))
            p = sums.setdefault(name, [0.0, 0.0])
            p[0] += hits / at
            p[1] += hits / len(hidden[row])
    n = len(rows)
    known = sum(1 for row in rows for t in hidden[row] if popularity.get(t))
    total_hidden = sum(len(hidden[row]) for row in rows)
    out = {"works_evaluated": n, "hidden_tags": total_hidden, "hide": hide, "at": at, "k": int(min(k, len(ids) - 1)),
           "kind": kind or "any", "text_weight": text_weight if text is not None else None,
           "distinct_visible_tags": len(popularity),
           "recoverable": round(known / total_hidden, 4) if total_hidden else 0.0}
    for name in ("visual", "text", "ensemble", "popularity"):
        if name in sums:
            out[name] = {f"precision_at_{at}": round(sums[name][0] / n, 4),
                         f"recall_at_{at}": round(sums[name][1] / n, 4)}
    return out


def _top(scores: dict, n: int) -> list:
    return [t for t, s in sorted(scores.items(), key=lambda x: (-x[1], x[0])) if s > 0][:n]
