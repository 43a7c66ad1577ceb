"""Data-quality audit: the plain computations (no storage, no Ray). ``artsim.report.audit`` streams a run directory
through them in bounded memory and writes ``reports/<name>/audit.json``.

What a registrar checks before trusting a similarity tool:

- **completeness** of each field per collection (``FieldCompleteness``: counts, never rows);
- **duplicate records**: the same object id twice, the same image URL on several records (``DuplicateFinder``:
  hash-partitioned passes, so memory is about ``budget`` 8-byte hashes whatever the run's size);
- **near-duplicate images**: perceptual hashes (``dhash``, ``phash``: 64 bits each, numpy + PIL) compared by
  Hamming distance, and embedding cosine after removing the mean vector (``near_duplicate_pairs``);
- **variant spellings** of one creator or term (``variant_groups``): spellings whose normalised forms collide,
  e.g. "Rembrandt van Rijn" / "Rembrandt Harmensz. van Rijn" / "REMBRANDT" / "Rijn, Rembrandt van";
- **licence coverage** and **failed image links by host** (``classify_status``).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.errors import ArtsimError

# fields whose completeness is counted (object_id, collection, local_id and source are always set by ingest)
AUDIT_FIELDS = ("title", "creator", "date", "date_begin", "culture", "medium", "object_type", "subjects",
                "concepts", "license", "image_url", "iiif_service", "landing_url", "description")

# download statuses grouped as a registrar reads them (artsim.rundir.schema.STATUSES)
STATUS_CATEGORY = {
    "ok": "ok",
    "not_found": "broken", "http_error": "broken", "timeout": "broken", "too_large": "broken",
    "not_image": "broken", "decode_error": "broken", "invalid_url": "broken",
    "blocked_address": "blocked", "robots_disallowed": "blocked",
    "opted_out": "opted_out", "license_excluded": "opted_out",
}


def classify_status(status: Optional[str]) -> str:
    """"ok", "broken", "blocked" (address or robots.txt), "opted_out" (rights holder / licence) or "other"."""
    return STATUS_CATEGORY.get(status or "", "other")


# -- completeness ---------------------------------------------------------------------------------------------------

def present_mask(column: pa.Array) -> pa.Array:
    """True where a value is there: not null, not blank text, not an empty list."""
    t = column.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pc.fill_null(pc.greater(pc.list_value_length(column), 0), False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(column), ""), False)
    return pc.is_valid(column)


class FieldCompleteness:
    """Per collection: records, and records with each field present (streamed batch by batch)."""

    def __init__(self, fields: Iterable[str] = AUDIT_FIELDS):
        self.fields = tuple(fields)
        self.records: Counter = Counter()
        self.present: dict[str, Counter] = defaultdict(Counter)
        self.licences: dict[str, Counter] = defaultdict(Counter)

    def update(self, batch) -> None:
        names = batch.schema.names
        collection = pc.fill_null(batch.column("collection"), "(none)") if "collection" in names else \
            pa.array(["(none)"] * batch.num_rows)
        cols = {"collection": collection}
        for name in self.fields:
            if name in names:
                cols[name] = pc.cast(present_mask(batch.column(name)), pa.int64())
        table = pa.table(cols)
        aggs = [(name, "sum") for name in cols if name != "collection"] + [("collection", "count")]
        for row in table.group_by("collection").aggregate(aggs).to_pylist():
            c = row["collection"]
            self.records[c] += row["collection_count"]
            for name in self.fields:
                if f"{name}_sum" in row:
                    self.present[c][name] += row[f"{name}_sum"] or 0
        if "license" in names:
            lic = pc.fill_null(pc.utf8_trim_whitespace(pc.cast(batch.column("license"), pa.string())), "")
            lic = pc.if_else(pc.equal(lic, ""), "(none)", lic)
            pairs = pa.table({"collection": collection, "license": lic})
            for row in pairs.group_by(["collection", "license"]).aggregate([("license", "count")]).to_pylist():
                self.licences[row["collection"]][row["license"]] += row["license_count"]

    def result(self, max_licences: int = 20) -> dict:
        out = {}
        for c in sorted(self.records, key=str):
            n = self.records[c]
            out[c] = {"records": n,
                      "fields": {f: {"present": int(self.present[c][f]),
                                     "share": round(self.present[c][f] / n, 4) if n else 0.0} for f in self.fields},
                      "licences": dict(self.licences[c].most_common(max_licences))}
            licensed = n - self.licences[c].get("(none)", 0) if self.licences[c] else 0
            out[c]["licence_coverage"] = round(licensed / n, 4) if n else 0.0
        return out


# -- duplicate keys (bounded memory) --------------------------------------------------------------------------------

class DuplicateFinder:
    """Values that occur on more than one row (object ids, image URLs) in a dataset of any size.

    ``batches()`` must yield (values, object_ids, collections) Arrow arrays, the same every call (a streamed
    pass). Values are hashed to 64 bits (``artsim.rundir.sample.stable_hashes``); pass p keeps only the hashes with
    ``hash % passes == p``, so memory is about ``budget`` hashes per pass and ``passes = ceil(rows / budget)``. A
    last pass reads the example groups' real values and rows (hash collisions cannot make a false example: the
    values are compared).
    """

    def __init__(self, batches: Callable[[], Iterator[tuple]], rows: int, budget: int = 2_000_000,
                 max_examples: int = 20, max_rows_per_example: int = 6):
        if budget < 1:
            raise ArtsimError("audit: duplicate budget must be positive")
        self.batches, self.rows, self.budget = batches, rows, budget
        self.max_examples, self.max_rows_per_example = max_examples, max_rows_per_example
        self.passes = max(1, -(-rows // budget))

    def _hashed(self):
        from artsim.rundir.sample import stable_hashes

        for values, ids, collections in self.batches():
            keep = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(pc.cast(values, pa.string())), ""), False)
            values = pc.filter(values, keep)
            if len(values):
                yield (stable_hashes(values, 0x617564), values, pc.filter(ids, keep),  # 'aud'
                       pc.filter(collections, keep))

    def run(self) -> dict:
        groups = rows_in_groups = 0
        examples: set = set()
        for p in range(self.passes):
            parts = [h[h % np.uint64(self.passes) == np.uint64(p)] for h, *_ in self._hashed()]
            hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
            uniq, counts = np.unique(hashes, return_counts=True)
            dup = counts > 1
            groups += int(dup.sum())
            rows_in_groups += int(counts[dup].sum())
            need = self.max_examples - len(examples)
            if need > 0:
                order = np.argsort(-counts[dup], kind="stable")[:need]  # the largest groups first
                examples |= set(uniq[dup][order].tolist())
        found: dict = {}
        if examples:
            wanted = np.array(sorted(examples), dtype=np.uint64)
            for h, values, ids, collections in self._hashed():
                hit = np.flatnonzero(np.isin(h, wanted))
                for j in hit.tolist():
                    group = found.setdefault(int(h[j]), {"value": values[j].as_py(), "rows": 0, "works": []})
                    if group["value"] != values[j].as_py():
                        continue  # a 64-bit collision: not the same value
                    group["rows"] += 1
                    if len(group["works"]) < self.max_rows_per_example:
                        group["works"].append({"object_id": ids[j].as_py(), "collection": collections[j].as_py()})
        shown = sorted((g for g in found.values() if g["rows"] > 1), key=lambda g: (-g["rows"], str(g["value"])))
        return {"groups": groups, "rows_in_groups": rows_in_groups, "passes": self.passes,
                "examples": shown}


# -- perceptual hashes ----------------------------------------------------------------------------------------------

def _gray(image, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.open(image)
    return np.asarray(im.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def _bits_to_uint64(bits: np.ndarray) -> int:
    return int(np.packbits(bits.astype(np.uint8).ravel()[:64]).view(">u8")[0])


def dhash(image) -> int:
    """Difference hash: 9x8 grayscale, one bit per horizontally adjacent pair (is the left one brighter?)."""
    g = _gray(image, (9, 8))
    return _bits_to_uint64(g[:, :-1] > g[:, 1:])


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(image) -> int:
    """DCT hash: 32x32 grayscale, 2-D DCT-II, the 8x8 lowest frequencies compared with their median (DC excluded
    from the median, as in the usual pHash)."""
    g = _gray(image, (32, 32))
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8]
    return _bits_to_uint64(low > np.median(low.ravel()[1:]))


def hamming(a: int, b: int) -> int:
    return int(bin((int(a) ^ int(b)) & ((1 << 64) - 1)).count("1"))


def hash_pairs(hashes: np.ndarray, max_distance: int, k: int = 8) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j for hashes within ``max_distance`` bits: each row's k nearest by Hamming
    distance (FAISS binary flat index), so the output is at most k pairs per row."""
    import faiss

    n = len(hashes)
    if n < 2:
        return []
    codes = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(n, 8))
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    dist, idx = index.search(codes, int(min(k + 1, n)))
    out = set()
    for i in range(n):
        for d, j in zip(dist[i], idx[i]):
            if j >= 0 and j != i and d <= max_distance:
                out.add((min(i, int(j)), max(i, int(j)), int(d)))
    return sorted(out, key=lambda x: (x[2], x[0], x[1]))


def near_duplicate_pairs(vectors: np.ndarray, min_cosine: float, k: int = 5,
                         search_dim: int = 64) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j whose embedding cosine is at least ``min_cosine`` after removing the mean vector:
    an embedding whose vectors all point one way (a random-init network gives pairwise cosines of 0.999) would
    otherwise call every pair a duplicate.

    Candidates are each row's ``k`` nearest in the top ``search_dim`` principal components (an exact search in
    2,048 dimensions costs 30x more), and every candidate pair is then checked with its exact cosine, so a
    reported pair always meets ``min_cosine``; a near duplicate the projection ranks below k others can be missed.
    """
    import faiss

    n = len(vectors)
    if n < 2:
        return []
    vectors = np.asarray(vectors, dtype=np.float32)
    mean = vectors.mean(axis=0)
    block = 4_096  # the centred matrix is never held whole: memory is the n x search_dim projection
    norms = np.concatenate([np.linalg.norm(vectors[s:s + block] - mean, axis=1) for s in range(0, n, block)])
    norms = np.maximum(norms, 1e-12)

    def centred(rows):
        return (vectors[rows] - mean) / norms[rows, None]

    basis = None
    if vectors.shape[1] > search_dim:
        fit = centred(np.sort(np.random.default_rng(0).choice(n, min(n, 4 * search_dim + 1_000), replace=False)))
        basis = np.linalg.svd(fit, full_matrices=False)[2][:search_dim].T
    parts = []
    for s in range(0, n, block):
        part = centred(np.arange(s, min(n, s + block)))
        if basis is not None:
            part = part @ basis
            part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        parts.append(part.astype(np.float32))
    search = np.ascontiguousarray(np.concatenate(parts))
    index = faiss.IndexFlatIP(search.shape[1])
    index.add(search)
    _, idx = index.search(search, int(min(k + 1, n)))
    out = {}
    for i in range(n):
        for j in idx[i]:
            if j < 0 or j == i:
                continue
            a, b = min(i, int(j)), max(i, int(j))
            if (a, b) in out:
                continue
            s = float((vectors[a] - mean) @ (vectors[b] - mean) / (norms[a] * norms[b]))
            if s >= min_cosine:
                out[(a, b)] = s
    return sorted(((i, j, s) for (i, j), s in out.items()), key=lambda x: (-x[2], x[0], x[1]))


# -- variant spellings ----------------------------------------------------------------------------------------------

_PARTICLES = {"van", "von", "de", "der", "den", "del", "della", "di", "da", "du", "le", "la", "des", "ter", "ten",
              "y", "e", "dos", "das", "zu", "af", "of", "the"}
_PAREN = re.compile(r"\([^)]*\)|\[[^\]]*\]")
_NON_WORD = re.compile(r"[^\w\s]+")
_YEARS = re.compile(r"\b(?:c\.\s*)?1\d{3}|\b20\d{2}")  # life dates ("1606–1669"); other numbers stay


def fold(text: str) -> str:
    """Lower case, accents removed, punctuation to spaces, whitespace collapsed: "Dürer, A." -> "durer a"."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_NON_WORD.sub(" ", plain.casefold()).split())


def name_tokens(name: str) -> list[str]:
    """The words of a person's name in "first ... last" order: bracketed notes and dates dropped, "Last, First"
    turned round, particles (van, de, ...) and initials dropped."""
    text = _PAREN.sub(" ", str(name))
    if text.count(",") == 1:
        last, first = text.split(",")
        if first.strip() and not _YEARS.search(first):
            text = f"{first} {last}"
    words = fold(_YEARS.sub(" ", text)).split()
    return [w for w in words if w not in _PARTICLES and (len(w) > 1 or w.isdigit())]


def name_key(name: str) -> str:
    """First and last significant word: "Rembrandt Harmensz. van Rijn" and "Rembrandt van Rijn" -> "rembrandt rijn"."""
    words = name_tokens(name)
    if not words:
        return ""
    return words[0] if len(words) == 1 else f"{words[0]} {words[-1]}"


def term_key(term: str) -> str:
    """Folded words, each with a plural -s/-es removed: "Portraits" / "portrait" / "PORTRAIT." -> "portrait"."""
    words = []
    for w in fold(term).split():
        if len(w) > 4 and w.endswith(("ches", "shes", "sses", "xes")):
            w = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        words.append(w)
    return " ".join(words)


def variant_groups(counts: Counter, kind: str = "creator", max_groups: int = 50) -> list[dict]:
    """Spellings (with their record counts) whose normalised forms collide, biggest groups first.

    ``kind="creator"``: spellings sharing ``name_key``; a one-word spelling ("REMBRANDT") joins a group only when
    exactly one group's first or last word is that word (an unambiguous short form). ``kind="term"``: ``term_key``.
    Each group: {"key", "spellings": [{"value", "records"}], "records", "preferred"} where preferred is the most
    used spelling (what a registrar would usually merge to).
    """
    if kind not in ("creator", "term"):
        raise ArtsimError(f"audit: variant kind must be 'creator' or 'term', got {kind!r}")
    keyed: dict[str, Counter] = defaultdict(Counter)
    single: dict[str, Counter] = defaultdict(Counter)
    for value, n in counts.items():
        if value is None or not str(value).strip():
            continue
        key = name_key(value) if kind == "creator" else term_key(value)
        if not key:
            continue
        if kind == "creator" and " " not in key:
            single[key][value] += n
        else:
            keyed[key][value] += n
    if kind == "creator":
        by_word: dict[str, set] = defaultdict(set)
        for key in keyed:
            first, last = key.split(" ")[0], key.split(" ")[-1]
            by_word[first].add(key)
            by_word[last].add(key)
        for word, spellings in single.items():
            owners = by_word.get(word, set())
            target = next(iter(owners)) if len(owners) == 1 else word
            keyed[target].update(spellings)
    groups = []
    for key, spellings in keyed.items():
        if len(spellings) < 2:
            continue
        ordered = sorted(spellings.items(), key=lambda x: (-x[1], x[0]))
        groups.append({"key": key, "records": sum(spellings.values()), "preferred": ordered[0][0],
                       "spellings": [{"value": v, "records": c} for v, c in ordered]})
    groups.sort(key=lambda g: (-len(g["spellings"]), -g["records"], g["key"]))
    return groups[:max_groups]


class BoundedCounter:
    """Distinct values and their counts, at most ``max_distinct`` of them (later new values are counted as
    ``dropped``), so a field with millions of spellings cannot exhaust the driver."""

    def __init__(self, max_distinct: int = 200_000):
        self.counts: Counter = Counter()
        self.max_distinct = max_distinct
        self.dropped = 0

    def update(self, values: Iterable) -> None:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):  # count in Arrow: only distinct values reach Python
            pairs = [(d["values"], d["counts"]) for d in pc.value_counts(values.drop_null()).to_pylist()]
        else:
            pairs = list(Counter(values).items())
        for value, n in pairs:
            if value is None or not str(value).strip():
                continue
            if value in self.counts or len(self.counts) < self.max_distinct:
                self.counts[value] += n
            else:
                self.dropped += n
