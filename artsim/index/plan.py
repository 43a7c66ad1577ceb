"""Planning an index build: plain functions and dataclasses, no Ray, no vectors (tested directly).

``plan_sampling`` draws the tuning-query and training candidates before the vectors are read (one scan finds them);
``plan_build`` turns the scan's outcome (which rows hold a good vector) and the previous build's ids into a
``BuildPlan``: the rows to index, their stable FAISS ids, the index type, the shards (contiguous row ranges) and the
id map. ``artsim.index.execute`` carries a plan out; ``artsim.index.publish`` writes its manifest.
"""
from __future__ import annotations

import dataclasses
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from artsim.errors import ArtsimError, ConfigError
from artsim.index.build import assign_ids, id_table, plan_shards
from artsim.index.factory import IndexPlan, choose_factory, kind_of_factory, nlist_for
from artsim.rundir.embeddings import first_good_rows

MIN_TRAIN_PER_LIST = 40


def choose_index(cfg, n: int, dim: int) -> IndexPlan:
    """The FAISS factory for ``n`` vectors of ``dim``: ``index.factory`` when set, else chosen by size and budget."""
    if cfg.factory:
        kind = kind_of_factory(cfg.factory)
        nlist = 0
        if kind == "ivf":
            m = re.search(r"IVF(\d+)", cfg.factory)
            nlist = int(m.group(1)) if m else nlist_for(n)
            if n < nlist:
                raise ConfigError("index.factory", f"{cfg.factory!r} has {nlist} lists but only {n} vectors")
        return IndexPlan(cfg.factory, kind, nlist, 0, "index.factory")
    return choose_factory(n, dim, cfg.memory_budget_gb, cfg.exact_max_vectors)


def sample_rows(rng: np.random.Generator, total: int, size: int, exclude: np.ndarray) -> np.ndarray:
    """``size`` distinct rows of ``range(total)`` not in ``exclude`` (sorted), sorted; never builds ``arange(total)``
    (tens of millions of rows)."""
    exclude = np.asarray(exclude, dtype=np.int64)
    available = total - len(exclude)
    picks = np.sort(rng.choice(available, size=min(size, available), replace=False)).astype(np.int64)
    # the p-th available row is p plus the number of excluded rows at or before it
    return picks + np.searchsorted(exclude - np.arange(len(exclude)), picks, side="right")


def rows_in(rows: np.ndarray, piece) -> np.ndarray:
    """The sorted ``rows`` that fall in ``piece`` (a contiguous run of the directory's rows)."""
    lo, hi = np.searchsorted(rows, [piece.first_row, piece.first_row + piece.num_rows])
    return rows[lo:hi]


@dataclass
class SamplingPlan:
    """Rows whose vectors the scan returns: held-out tuning queries and (trained indexes) training candidates.
    Tuning queries are never training points, so recall is measured on unseen vectors."""
    rng: np.random.Generator
    provisional: IndexPlan  # the index type for every row; the real one (fewer rows) is never a bigger kind
    query_candidates: np.ndarray
    train_candidates: np.ndarray


def plan_sampling(cfg, total: int, dim: int) -> SamplingPlan:
    rng = np.random.default_rng(cfg.seed)
    provisional = choose_index(cfg, total, dim)
    query_candidates = sample_rows(rng, total, min(cfg.tuning_queries, max(1, total // 10)), np.zeros(0, np.int64))
    train_candidates = np.zeros(0, np.int64)
    if provisional.kind != "flat":
        exclude = query_candidates if total - len(query_candidates) >= 1000 else np.zeros(0, np.int64)
        train_candidates = sample_rows(rng, total, max(cfg.train_sample, MIN_TRAIN_PER_LIST * provisional.nlist),
                                       exclude)
    return SamplingPlan(rng, provisional, query_candidates, train_candidates)


@dataclass
class BuildPlan:
    """Everything an index build does, decided before any vector is added.

    Made in the plan task (``artsim.index.ray_tasks.plan_task``); the driver keeps only ``without_rows()``: the
    per-row parts (rows, ids, the shards' rows and ids, the id map) go to the object store, so the driver's memory
    does not grow with the number of vectors."""
    name: str
    index_uri: str
    emb_uri: str
    dim: int
    rows: np.ndarray  # sorted rows of the embeddings directory that are indexed
    skipped: dict  # reason -> rows not indexed
    ids: np.ndarray  # FAISS id of each indexed row
    next_id: int
    reused_ids: int
    index: IndexPlan
    shards: list  # ShardPlan per shard
    ids_table: object  # pyarrow Table: id, object_id, shard, facets, metadata (sorted by id)
    queries: np.ndarray  # float32 (q, dim) held-out tuning queries
    train_masks: list = field(default_factory=list)  # per scanned piece with training candidates: which are used
    train_pieces: list = field(default_factory=list)  # indices of those pieces
    build_id: str = ""
    indexed: int = 0  # len(rows), kept when the rows are dropped (without_rows)
    shard_sizes: list = field(default_factory=list)  # rows per shard, in shard order

    @property
    def n(self) -> int:
        return self.indexed

    def without_rows(self) -> "BuildPlan":
        """This plan minus everything per row (rows, ids, shards, id map): bounded whatever N."""
        empty = np.zeros(0, np.int64)
        return dataclasses.replace(self, rows=empty, ids=empty, shards=[], ids_table=None)

    @property
    def n_train(self) -> int:
        return int(sum(m.sum() for m in self.train_masks))


def plan_build(cfg, *, name: str, index_uri: str, emb_uri: str, dim: int, files, pieces, object_ids, good,
               sampling: SamplingPlan, query_vectors: np.ndarray, previous_ids, previous_next_id: int,
               records=None, build_id: Optional[str] = None) -> BuildPlan:
    """The build for the scanned rows: ``good`` (one bool per row of the directory), ``query_vectors`` (the scan's
    vectors of ``sampling.query_candidates``, in order), the previous build's id map (ids stay stable) and the
    facet/metadata columns of records/ (or None)."""
    import pyarrow as pa

    rows, skipped = first_good_rows(object_ids, good)
    n = len(rows)
    if n == 0:
        raise ArtsimError(f"embeddings: no row of {emb_uri} has a valid vector and object_id; nothing to index "
                          f"(skipped: {skipped})")
    kept_object_ids = object_ids.take(pa.array(rows))
    ids, next_id, reused = assign_ids(kept_object_ids, previous_ids, previous_next_id)
    index = choose_index(cfg, n, dim)
    shard_plans = plan_shards(files, rows, ids, cfg.num_shards)
    shard_of = np.repeat(np.arange(len(shard_plans), dtype=np.int32), [len(p.rows) for p in shard_plans])
    ids_table = id_table(ids, kept_object_ids, shard_of, records, cfg.facets, cfg.metadata)

    usable = np.isin(sampling.query_candidates, rows)
    query_vectors = query_vectors[usable]
    n_queries = min(cfg.tuning_queries, max(1, n // 10), len(query_vectors))
    if n_queries < len(query_vectors):
        query_vectors = query_vectors[np.sort(sampling.rng.choice(len(query_vectors), size=n_queries,
                                                                  replace=False))]
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    if len(queries) == 0:
        raise ArtsimError(f"embeddings: none of the sampled tuning rows of {emb_uri} is indexable "
                          f"(skipped: {skipped}); too few good rows to tune")
    train_masks, train_pieces = [], []
    if index.kind != "flat":
        if sampling.provisional.kind == "flat":  # cannot happen: fewer rows never leave the exact regime
            raise ArtsimError("index: internal error: no training candidates were drawn for a trained index")
        for i, piece in enumerate(pieces):
            mask = np.isin(rows_in(sampling.train_candidates, piece), rows)
            if mask.any():
                train_masks.append(mask)
                train_pieces.append(i)
    return BuildPlan(name, index_uri, emb_uri, int(dim), rows, skipped, ids, int(next_id), int(reused), index,
                     shard_plans, ids_table, queries, train_masks, train_pieces,
                     build_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}", n,
                     [len(p.rows) for p in shard_plans])
