"""Records as a mining corpus: integer ids, creators, collections and inverted indexes of controlled terms.

Strategies sample millions of times, so everything they look up is precomputed here once: for every term (a
subject, a concept URI, an object type or a medium) the sorted array of objects that carry it, and for every object
its terms. Terms are normalised (case, whitespace) so that "Horses" and "horses " are one term.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from artsim.rundir.names import collection_of, normalise_creator
from artsim.rundir.sample import sample_rows, stream_batches

# Term fields and how a reason names them ("shared subject: horses").
TERM_FIELDS = {"subjects": "subject", "concepts": "concept", "object_type": "object type", "medium": "medium"}
def normalise_term(value: str) -> str:
    return " ".join(str(value).split()).casefold()


@dataclass(frozen=True)
class Term:
    field: str  # one of TERM_FIELDS
    key: str  # normalised value
    label: str  # the value as the first record spelled it

    @property
    def reason(self) -> str:
        return f"shared {TERM_FIELDS[self.field]}: {self.label}"


@dataclass
class MiningCorpus:
    """The objects that may appear in triplets, with lookups by term and creator."""

    object_ids: list[str]
    collections: np.ndarray  # object index -> collection name (object array)
    terms: list[Term] = field(default_factory=list)  # term index -> Term
    object_terms: list[np.ndarray] = field(default_factory=list)  # object index -> sorted term indices
    term_members: list[np.ndarray] = field(default_factory=list)  # term index -> sorted object indices
    creators: list[Optional[str]] = field(default_factory=list)  # object index -> normalised creator or None
    creator_labels: dict[str, str] = field(default_factory=dict)  # normalised creator -> as spelled
    creator_members: dict[str, np.ndarray] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # metadata text (see artsim.text.record_text)
    titles: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.object_ids)

    def index_of(self) -> dict[str, int]:
        return {oid: i for i, oid in enumerate(self.object_ids)}

    def has_term(self, obj: int, term: int) -> bool:
        terms = self.object_terms[obj]
        pos = np.searchsorted(terms, term)
        return bool(pos < len(terms) and terms[pos] == term)

    def shares_field_term(self, a: int, b: int, field_name: str) -> bool:
        """Whether objects a and b have any term of ``field_name`` in common."""
        common = np.intersect1d(self.object_terms[a], self.object_terms[b], assume_unique=True)
        return any(self.terms[t].field == field_name for t in common)

    def subset(self, indices: Sequence[int]) -> "MiningCorpus":
        """The corpus restricted to ``indices`` (e.g. one collection), with terms re-indexed."""
        indices = np.asarray(indices, dtype=np.int64)
        return build_corpus(
            [self.object_ids[i] for i in indices],
            [self.collections[i] for i in indices],
            [[(self.terms[t].field, self.terms[t].label) for t in self.object_terms[i]] for i in indices],
            [self.creator_labels.get(self.creators[i]) if self.creators[i] else None for i in indices],
            texts=[self.texts[i] for i in indices] if self.texts else None,
            titles=[self.titles[i] for i in indices] if self.titles else None,
        )


def record_terms(record: dict, fields: Iterable[str] = tuple(TERM_FIELDS)) -> list[tuple[str, str]]:
    """(field, value) pairs of the controlled terms of a canonical record."""
    out = []
    for name in fields:
        value = record.get(name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and str(v).strip():
                out.append((name, str(v).strip()))
    return out


def build_corpus(object_ids: Sequence[str], collections: Sequence[str], terms_per_object: Sequence[list],
                 creators: Sequence[Optional[str]], texts: Optional[Sequence[str]] = None,
                 titles: Optional[Sequence[str]] = None) -> MiningCorpus:
    term_index: dict[tuple[str, str], int] = {}
    terms: list[Term] = []
    members: list[list[int]] = []
    object_terms = []
    for i, pairs in enumerate(terms_per_object):
        mine = set()
        for field_name, value in pairs:
            key = (field_name, normalise_term(value))
            t = term_index.get(key)
            if t is None:
                t = term_index[key] = len(terms)
                terms.append(Term(field_name, key[1], value))
                members.append([])
            if t not in mine:
                mine.add(t)
                members[t].append(i)
        object_terms.append(np.array(sorted(mine), dtype=np.int64))
    creator_keys, creator_labels, creator_lists = [], {}, {}
    for i, c in enumerate(creators):
        key = normalise_creator(c)
        creator_keys.append(key)
        if key is not None:
            creator_labels.setdefault(key, " ".join(str(c).split()))
            creator_lists.setdefault(key, []).append(i)
    return MiningCorpus(
        object_ids=list(object_ids),
        collections=np.array(list(collections), dtype=object),
        terms=terms,
        object_terms=object_terms,
        term_members=[np.array(m, dtype=np.int64) for m in members],
        creators=creator_keys,
        creator_labels=creator_labels,
        creator_members={k: np.array(v, dtype=np.int64) for k, v in creator_lists.items()},
        texts=list(texts) if texts is not None else [],
        titles=list(titles) if titles is not None else [],
    )


def corpus_from_records(records: Iterable[dict], fields: Iterable[str] = tuple(TERM_FIELDS)) -> MiningCorpus:
    """A corpus from canonical record dicts (rows of ``records/``). Records without object_id are skipped.

    ``records`` may be a generator: each record is reduced to what mining keeps (terms, creator, text, title) as it
    arrives, so the full dicts (descriptions, URLs) of a large pool are never all in memory at once.
    """
    from artsim.text import record_text

    fields = tuple(fields)
    unknown = [f for f in fields if f not in TERM_FIELDS]
    if unknown:
        raise ValueError(f"unknown term fields {unknown}; expected some of {list(TERM_FIELDS)}")
    seen = set()
    object_ids, collections, terms, creators, texts, titles = [], [], [], [], [], []
    for r in records:
        oid = r.get("object_id")
        if not oid or oid in seen:
            continue  # duplicates are the ingest stage's business; mining uses each object once
        seen.add(oid)
        object_ids.append(oid)
        collections.append(collection_of(oid, r.get("collection")))
        terms.append(record_terms(r, fields))
        creators.append(r.get("creator"))
        texts.append(record_text(r))
        titles.append((r.get("title") or "").strip())
    return build_corpus(object_ids, collections, terms, creators, texts=texts, titles=titles)


# ---------------------------------------------------------------------------------------------------------------
# The mining pool: at most mine.max_objects objects of records/, chosen without reading records/ whole
#
# An aggregator's records/ holds tens of millions of works; a training set needs 10k-250k triplets. Mining draws
# from a pool instead: per collection, the objects with the smallest salted hash of their object_id (a uniform,
# deterministic sample that does not depend on file layout or row order), with quotas proportional to collection
# size and a floor so that every collection is represented (mine.same_collection mines inside each one). Curator
# annotations' objects join the pool whatever their hash. records/ is streamed three times in Arrow batches: object
# ids and collections to count, the same to pick, then only the mining columns of the picked rows.

# The columns of records/ that mining reads (corpus_from_records and record_text); the others are never read.
MINING_COLUMNS = ("object_id", "collection", "title", "creator", "culture", "medium", "object_type", "subjects",
                  "concepts", "description")
ROW_BATCH_ROWS = 4_096  # rows per Arrow batch while streaming the mining columns (descriptions can be long)


@dataclass
class PoolInfo:
    """What the pool is, for the report: ``objects`` of ``records`` records, sampled or not."""

    records: int  # rows of records/ with an object_id
    objects: int = 0  # distinct objects in the pool (the corpus size)
    sampled: bool = False
    max_objects: int = 0
    collections: int = 0
    quotas: dict = field(default_factory=dict)  # collection -> sampled objects (sampled pools only)
    annotated_added: int = 0  # rows outside the sample taken because a curator annotation names them
    rows_read: int = 0  # rows of records/ whose mining columns were read

    @property
    def line(self) -> str:
        how = "sampled per collection" if self.sampled else "all of them"
        return f"pool: {self.objects} of {self.records} records ({how})"

    def as_dict(self) -> dict:
        return {"objects": self.objects, "records": self.records, "sampled": self.sampled,
                "max_objects": self.max_objects, "collections": self.collections,
                "annotated_added": self.annotated_added, "rows_read": self.rows_read,
                "quotas": self.quotas}


def read_pool(storage, uri: str, max_objects: int, seed: int, fields: Iterable[str] = tuple(TERM_FIELDS),
              always: Iterable[str] = (), files: Optional[list[str]] = None) -> tuple[MiningCorpus, PoolInfo]:
    """The mining corpus of records/ at ``uri``: every record when there are at most ``max_objects``, else the
    stratified hash sample described above, plus the records whose object_id is in ``always`` (annotated works).
    Only MINING_COLUMNS are read, and only the pool's rows become Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    files = storage.dataset_files(uri) if files is None else files
    sample = sample_rows(storage, files, max_objects, seed)
    info = PoolInfo(records=sample.total, max_objects=max_objects, sampled=sample.sampled,
                    collections=len(sample.counts), quotas=sample.quotas)
    picked: Optional[np.ndarray] = sample.rows if sample.sampled else None
    always_ids = pa.array(sorted(set(always)), pa.string())

    def rows():
        for first, batch in stream_batches(storage, files, MINING_COLUMNS):
            if picked is not None:
                positions = np.arange(first, first + batch.num_rows)
                slot = np.minimum(np.searchsorted(picked, positions), max(len(picked) - 1, 0))
                in_sample = picked[slot] == positions if len(picked) else np.zeros(batch.num_rows, bool)
                ids = batch.column(batch.schema.names.index("object_id"))
                annotated = pc.fill_null(pc.is_in(ids, value_set=always_ids), False).to_numpy(
                    zero_copy_only=False)
                info.annotated_added += int((annotated & ~in_sample).sum())
                batch = batch.filter(pa.array(in_sample | annotated))
            info.rows_read += batch.num_rows
            yield from batch.to_pylist()

    corpus = corpus_from_records(rows(), fields)
    info.objects = corpus.size
    if not info.collections:
        info.collections = len(set(corpus.collections.tolist()))
    return corpus, info
