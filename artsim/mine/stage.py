"""The mine stage: records/ (+ curator annotations, + image embeddings) -> triplets/.

``mine_triplets`` is the plain-function core (no I/O): it splits mine.num_triplets into per-strategy quotas by
weight, runs the strategies (per collection when mine.same_collection), de-duplicates across strategies, tops up
from strategies that still have triplets to give when others run dry, and reports what it did. ``run_mine`` reads
the inputs through Storage, prints progress and the per-strategy table, and writes ``triplets/`` (Parquet:
anchor_id, positive_id, negative_id, reason, strategy) with ``triplets/_report.json`` inside it, atomically.

Mining works on a pool of at most mine.max_objects objects (``artsim.mine.corpus.read_pool``: a per-collection
hash sample of records/, plus every object a curator annotation names), so the driver's memory and the text
encoding time follow the pool, not the size of records/.
"""
from __future__ import annotations

import csv
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from artsim.config import MineConfig
from artsim.console import say, table
from artsim.errors import ArtsimError, ConfigError
from artsim.mine.corpus import MiningCorpus, read_pool
from artsim.mine.strategies import (
    STRATEGIES, Annotation, Triplet, mine_annotations, mine_hard_negatives, mine_same_creator, mine_shared_terms,
    mine_text, text_neighbourhoods,
)
from artsim.rundir.embeddings import load_embedding_matrix
from artsim.rundir.names import embeddings_key
from artsim.rundir.schema import TRIPLETS_SCHEMA
from artsim.storage import join

@dataclass
class MiningInputs:
    """What the strategies may draw on besides the records. Missing inputs make their strategies skip."""

    text_vectors: Optional[np.ndarray] = None  # (N, d) aligned with corpus.object_ids
    image_vectors: Optional[np.ndarray] = None  # (M, d) L2-normalised
    image_objects: Optional[np.ndarray] = None  # (M,) corpus indices of image_vectors' rows
    annotations: Optional[list] = None  # list[Annotation]
    image_embeddings_name: Optional[str] = None  # for messages


@dataclass
class MiningResult:
    triplets: list[Triplet]
    report: dict = field(default_factory=dict)


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` by weight (largest remainders), so quotas add up exactly."""
    positive = {k: w for k, w in weights.items() if w > 0}
    if not positive:
        return {k: 0 for k in weights}
    s = sum(positive.values())
    raw = {k: total * w / s for k, w in positive.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: total - sum(out.values())]:
        out[k] += 1
    return {k: out.get(k, 0) for k in weights}


def _unavailable(name: str, inputs: MiningInputs) -> Optional[str]:
    if name == "text" and inputs.text_vectors is None:
        return "no text vectors"
    if name == "hard_negatives" and inputs.image_vectors is None:
        return f"no image embeddings{f' ({inputs.image_embeddings_name})' if inputs.image_embeddings_name else ''}"
    if name == "annotations" and not inputs.annotations:
        return "no annotations (mine.annotations is not set or the file has no rows)"
    return None


def _run_strategy(name: str, corpus: MiningCorpus, n: int, rng: np.random.Generator, taken: set, cfg: MineConfig,
                  inputs: MiningInputs, cache: dict) -> tuple[list[Triplet], dict]:
    if n <= 0 and name != "annotations":
        return [], {}
    if name == "shared_terms":
        return mine_shared_terms(corpus, n, rng, taken, fields=cfg.term_fields), {}
    if name == "same_creator":
        return mine_same_creator(corpus, n, rng, taken), {}
    if name == "text":
        if "text_hoods" not in cache:  # k-NN + k-means once per corpus, reused by top-up rounds
            cache["text_hoods"] = text_neighbourhoods(inputs.text_vectors, cfg.text_neighbors, seed=cfg.seed)
        return mine_text(corpus, n, rng, inputs.text_vectors, taken, neighbours=cfg.text_neighbors,
                         min_similarity=cfg.text_min_similarity, hoods=cache["text_hoods"], seed=cfg.seed), {}
    if name == "annotations":
        return mine_annotations(corpus, inputs.annotations, n, rng, taken)
    if name == "hard_negatives":
        return mine_hard_negatives(corpus, n, rng, inputs.image_vectors, inputs.image_objects, taken,
                                   k=cfg.hard_negative_k, fields=cfg.term_fields), {}
    raise ConfigError(f"mine.strategies.{name}", "unknown strategy")


def _restrict(inputs: MiningInputs, corpus: MiningCorpus, indices: np.ndarray) -> tuple[MiningCorpus, MiningInputs]:
    """The corpus and inputs of one collection (for mine.same_collection)."""
    sub = corpus.subset(indices)
    position = {int(g): i for i, g in enumerate(indices)}
    image_vectors = image_objects = None
    if inputs.image_vectors is not None:
        keep = np.array([int(o) in position for o in inputs.image_objects], dtype=bool)
        image_vectors = inputs.image_vectors[keep]
        image_objects = np.array([position[int(o)] for o in inputs.image_objects[keep]], dtype=np.int64)
    annotations = None
    if inputs.annotations:
        # Only this collection's part of each annotation; ids elsewhere are counted once by _annotation_issues.
        inside = set(sub.object_ids)
        annotations = [Annotation(r.line, r.anchor, [x for x in r.similar if x in inside],
                                  [x for x in r.dissimilar if x in inside])
                       for r in inputs.annotations if r.anchor in inside]
    return sub, MiningInputs(
        text_vectors=inputs.text_vectors[indices] if inputs.text_vectors is not None else None,
        image_vectors=image_vectors, image_objects=image_objects,
        annotations=annotations, image_embeddings_name=inputs.image_embeddings_name)


def _annotation_issues(corpus: MiningCorpus, annotations: list, same_collection: bool) -> dict:
    index = corpus.index_of()
    unknown = [x for r in annotations for x in [r.anchor, *r.similar, *r.dissimilar] if x not in index]
    out = {"rows": len(annotations), "unknown_ids": len(unknown), "unknown_examples": unknown[:5]}
    if same_collection:
        out["cross_collection_ids"] = sum(
            1 for r in annotations if r.anchor in index for x in [*r.similar, *r.dissimilar]
            if x in index and corpus.collections[index[x]] != corpus.collections[index[r.anchor]])
    return out


def mine_triplets(corpus: MiningCorpus, cfg: MineConfig, inputs: Optional[MiningInputs] = None,
                  progress=None) -> MiningResult:
    """Mine at least cfg.num_triplets triplets (fewer only when the collection has no more); see module doc."""
    started = time.perf_counter()
    inputs = inputs or MiningInputs()
    rng = np.random.default_rng(cfg.seed)
    weights = {name: float(w) for name, w in cfg.strategies.items() if w > 0}
    status = {name: "ok" for name in weights}
    for name in list(weights):
        why = _unavailable(name, inputs)
        if why:
            status[name] = f"skipped: {why}"
            weights.pop(name)
    if not weights:
        raise ArtsimError("mine: none of the configured strategies can run here: "
                          + "; ".join(f"{k} {v}" for k, v in status.items()))

    # Parts: the whole corpus, or one per collection (each gets a share of every quota by its size).
    if cfg.same_collection:
        collections = sorted(set(corpus.collections.tolist()))
        parts = []
        for c in collections:
            idx = np.flatnonzero(corpus.collections == c)
            parts.append((c, *_restrict(inputs, corpus, idx)))
    else:
        parts = [(None, corpus, inputs)]
    part_share = np.array([p[1].size for p in parts], dtype=np.float64)
    part_share = part_share / part_share.sum() if part_share.sum() else part_share

    taken: set = set()
    mined: dict[str, list[Triplet]] = {name: [] for name in weights}
    exhausted: set = set()
    issues: dict = {}
    caches = [dict() for _ in parts]
    quotas = allocate(cfg.num_triplets, weights)

    def run_round(round_quotas: dict[str, int]) -> None:
        for name, quota in round_quotas.items():
            if name in exhausted or (quota <= 0 and name != "annotations"):
                continue
            part_quotas = allocate(quota, {i: s for i, s in enumerate(part_share)})
            got_total = 0
            for i, (_, part_corpus, part_inputs) in enumerate(parts):
                got, extra = _run_strategy(name, part_corpus, part_quotas[i], rng, taken, cfg, part_inputs,
                                           caches[i])
                got_total += len(got)
                mined[name].extend(got)
                if extra:
                    issues[name] = extra
            if got_total < quota:
                exhausted.add(name)
            if progress:
                progress(name, sum(len(v) for v in mined.values()))

    run_round(quotas)
    if "annotations" in weights:
        issues["annotations"] = _annotation_issues(corpus, inputs.annotations, cfg.same_collection)
    exhausted.add("annotations")  # every curated triplet was taken in the first round; top-ups come from others
    # Top up: strategies that could still give more cover for those that ran dry.
    for _ in range(20):
        short = cfg.num_triplets - sum(len(v) for v in mined.values())
        live = {k: w for k, w in weights.items() if k not in exhausted}
        if short <= 0 or not live:
            break
        run_round(allocate(short, live))

    triplets = [t for name in weights for t in mined[name]]
    order = rng.permutation(len(triplets))  # mix strategies so that any slice of triplets/ is representative
    triplets = [triplets[i] for i in order]
    counts = Counter(t.strategy for t in triplets)
    total = len(triplets)
    report = {
        "requested": cfg.num_triplets,
        "mined": total,
        "complete": total >= cfg.num_triplets,
        "objects": corpus.size,
        "objects_used": len({x for t in triplets for x in t.key}),
        "same_collection": cfg.same_collection,
        "strategies": {
            name: {"weight": float(cfg.strategies.get(name, 0)), "quota": quotas.get(name, 0),
                   "mined": counts.get(name, 0),
                   "status": status[name] if status[name] != "ok"
                   else ("exhausted" if name in exhausted and name != "annotations" else "ok")}
            for name in status
        },
        "top_reasons": Counter(t.reason for t in triplets).most_common(15),
        "issues": issues,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if total < cfg.num_triplets:
        report["note"] = (f"the collection yields only {total} distinct triplets under these strategies "
                          f"(requested {cfg.num_triplets}); mined what exists")
    return MiningResult(triplets, report)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def parse_annotations_csv(text: str, source: str = "mine.annotations") -> list[Annotation]:
    """Curator annotations: columns ``anchor``, ``similar`` and optionally ``dissimilar`` (object_ids).

    A cell may list several ids separated by "|" (a Training-the-Archive grid: one anchor, the works a curator
    picked as similar, the ones they rejected). Rows without an anchor or a similar id are ignored and counted.
    """
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    for required in ("anchor", "similar"):
        if required not in columns:
            raise ConfigError(source, f"the CSV needs a {required!r} column (has: {', '.join(columns) or 'none'})")
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "") for k, v in raw.items() if k is not None}

        def ids(cell: str) -> list[str]:
            return [x.strip() for x in cell.split("|") if x.strip()]

        anchor = row.get("anchor", "").strip()
        similar = ids(row.get("similar", ""))
        if not anchor or not similar:
            continue
        rows.append(Annotation(line, anchor, similar, ids(row.get("dissimilar", ""))))
    return rows


def run_mine(ctx, **_options) -> dict:
    cfg: MineConfig = ctx.config.mine
    storage, paths = ctx.storage, ctx.paths
    started = time.perf_counter()
    files = storage.dataset_files(paths.records)
    inputs = MiningInputs()
    wanted = {k for k, w in cfg.strategies.items() if w > 0}
    if "annotations" in wanted and cfg.annotations:
        if not storage.exists(cfg.annotations):
            raise ConfigError("mine.annotations", f"{cfg.annotations}: file not found")
        inputs.annotations = parse_annotations_csv(storage.read_text(cfg.annotations))
        say(f"mine: {len(inputs.annotations)} curator annotation rows from {cfg.annotations}")
    annotated = {x for r in inputs.annotations or [] for x in [r.anchor, *r.similar, *r.dissimilar]}
    try:
        corpus, pool = read_pool(storage, paths.records, cfg.max_objects, cfg.seed, cfg.term_fields,
                                 always=annotated, files=files)
    except ValueError as e:  # more collections than max_objects
        raise ConfigError("mine.max_objects", str(e)) from None
    say(f"mine: {pool.line}" + (f", {pool.annotated_added} added for curator annotations"
                                if pool.annotated_added else ""))
    say(f"mine: {corpus.size} objects, {len(corpus.terms)} distinct terms, {len(corpus.creator_members)} creators")
    if corpus.size < 3:
        raise ArtsimError(f"{paths.records}: {corpus.size} records; mining needs at least 3 objects")
    if "text" in wanted:
        from artsim.text import load_sentence_encoder

        t0 = time.perf_counter()
        encode = load_sentence_encoder()
        vectors = []
        batch = 2048
        for start in range(0, corpus.size, batch):  # texts encoded = pool size (mine.max_objects bounds it)
            vectors.append(encode(corpus.texts[start:start + batch]))
            if corpus.size > batch:
                done = min(start + batch, corpus.size)
                rate = done / max(time.perf_counter() - t0, 1e-9)
                say(f"mine: text embeddings {done}/{corpus.size} ({rate:.0f} texts/s, "
                    f"~{(corpus.size - done) / rate:.0f} s left)")
        inputs.text_vectors = np.concatenate(vectors)
        say(f"mine: embedded {corpus.size} metadata texts in {time.perf_counter() - t0:.1f} s")
    if "hard_negatives" in wanted:
        key = embeddings_key(ctx, cfg.embeddings, "mine.embeddings", required=False)
        inputs.image_embeddings_name = f"embeddings/{key}" if key else None
        uri = paths.embeddings(key) if key else None
        if uri and storage.is_complete(uri):
            index = corpus.index_of()
            ids, matrix = load_embedding_matrix(storage, uri, keep=index)  # only the pool's rows are kept
            rows = [i for i, oid in enumerate(ids) if oid in index]
            inputs.image_vectors = matrix[rows]
            inputs.image_objects = np.array([index[ids[i]] for i in rows], dtype=np.int64)
            say(f"mine: hard negatives from {uri} ({len(rows)} objects with embeddings)")
        else:
            say(f"mine: hard_negatives skipped: no complete embeddings at {uri or 'embeddings/'} (run embed first)")

    result = mine_triplets(corpus, cfg, inputs,
                           progress=lambda name, n: say(f"mine: {name} done, {n} triplets so far"))
    triplets, report = result.triplets, result.report
    report["pool"] = pool.as_dict()
    report["pool"]["line"] = pool.line
    tab = pa.table({
        "anchor_id": [t.anchor_id for t in triplets], "positive_id": [t.positive_id for t in triplets],
        "negative_id": [t.negative_id for t in triplets], "reason": [t.reason for t in triplets],
        "strategy": [t.strategy for t in triplets]}, schema=TRIPLETS_SCHEMA)
    report["seconds_total"] = round(time.perf_counter() - started, 3)
    with storage.atomic_dir(paths.triplets) as staging:
        storage.write_parquet_file(tab, join(staging, "part-00000.parquet"))
        storage.write_json(join(staging, "_report.json"), report)

    table(["strategy", "weight", "quota", "mined", "status"],
          [(k, v["weight"], v["quota"], v["mined"], v["status"]) for k, v in report["strategies"].items()])
    for name, extra in report["issues"].items():
        if extra.get("unknown_ids"):
            say(f"mine: {name}: {extra['unknown_ids']} ids not in records/ were ignored "
                f"(e.g. {', '.join(extra['unknown_examples'])})")
    if not report["complete"]:
        say(f"mine: NOTE {report['note']}")
    say(f"mine: wrote {report['mined']} triplets over {report['objects_used']} objects to {paths.triplets} "
        f"in {report['seconds_total']:.1f} s ({pool.line})")
    return {"triplets": report["mined"], "requested": cfg.num_triplets, "complete": report["complete"],
            "by_strategy": {k: v["mined"] for k, v in report["strategies"].items()},
            "output": paths.triplets, "seconds": report["seconds_total"], "pool": pool.as_dict()}


__all__ = ["STRATEGIES", "MiningInputs", "MiningResult", "allocate", "mine_triplets", "parse_annotations_csv",
           "run_mine", "TRIPLETS_SCHEMA"]
