"""The links stage — "connect the museums": for every indexed work, its top-k most similar works in each other
collection (and in its own with ``links.include_own_collection``), written to links/<name>/ with columns
object_id, neighbor_id, rank (1 = most similar), score (cosine similarity), neighbor_collection.

`links_for_batch` is the plain logic (one batch of works against one open :class:`ShardedIndex`, one conditional
search per target collection). `run_links` is the Ray layer: the works are cut into batches, Ray tasks each open
the index (verified, cached per node) and write one Parquet part per batch into the staged output directory, which
gets its _SUCCESS marker only when every part is there.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import Counter, defaultdict
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from artsim.console import Progress, say, table
from artsim.errors import ArtsimError
from artsim.rundir.schema import LINKS_SCHEMA
from artsim.storage import Storage, join

def links_for_batch(index, object_ids: Sequence[str], collections: Sequence[str], target_collections: Sequence[str],
                    k: int, include_own_collection: bool) -> pa.Table:
    """Links of the works ``object_ids`` (whose collections are ``collections``) into ``target_collections``."""
    object_ids = list(object_ids)
    collections = np.asarray(list(collections), dtype=object)
    ids = index.faiss_ids(object_ids)
    vectors = index.vectors_for_ids(object_ids)
    out = {name: [] for name in LINKS_SCHEMA.names}
    for target in target_collections:
        # A work's own collection is skipped unless asked for; the work itself is never its own neighbour.
        which = np.arange(len(object_ids)) if include_own_collection else np.nonzero(collections != target)[0]
        if len(which) == 0:
            continue
        scores, hit_ids = index.search_arrays(vectors[which], k, where={"collection": target},
                                              exclude_ids=ids[which])
        valid = hit_ids >= 0
        q_rows, ranks = np.nonzero(valid)
        out["object_id"].extend(np.asarray(object_ids, dtype=object)[which[q_rows]].tolist())
        out["neighbor_id"].extend(index.object_ids_of(hit_ids[valid]).tolist())
        # ranks among valid hits: hits are packed best first, so the column position is the rank
        out["rank"].extend((ranks + 1).tolist())
        out["score"].extend(scores[valid].tolist())
        out["neighbor_collection"].extend([target] * int(valid.sum()))
    return pa.table(out, schema=LINKS_SCHEMA)


def pair_stats(links: pa.Table, collection_of: dict) -> dict:
    """{(from_collection, to_collection): [links, sum of scores]} for the summary."""
    stats: dict = defaultdict(lambda: [0, 0.0])
    for obj, to, score in zip(links.column("object_id").to_pylist(), links.column("neighbor_collection").to_pylist(),
                              links.column("score").to_pylist()):
        entry = stats[(collection_of[obj], to)]
        entry[0] += 1
        entry[1] += score
    return dict(stats)


def run_links(ctx, **options) -> dict:
    import ray

    from artsim.runtime import ensure_ray
    from artsim.serving import read_index_ids

    ensure_ray(ctx.config)
    cfg = ctx.config.links
    storage, paths = ctx.storage, ctx.paths
    started = time.perf_counter()
    from artsim.rundir.names import links_name

    name = links_name(ctx)
    index_uri, out_uri = paths.index(name), paths.links(name)
    if not storage.exists(join(index_uri, "manifest.json")):
        raise ArtsimError(f"{index_uri}: no index to link from; run the index stage first")
    manifest, ids_table = read_index_ids(index_uri, storage, cache_dir=_node_cache_dir(index_uri))
    if "collection" not in ids_table.column_names:
        raise ArtsimError(f"{index_uri}: ids.parquet has no collection column; add collection to index.facets")
    object_ids = ids_table.column("object_id").to_pylist()
    collections = ids_table.column("collection").to_pylist()
    targets = sorted(set(c for c in collections if c is not None))
    n = len(object_ids)
    n_batches = max(1, -(-n // cfg.batch_size))
    n_tasks = min(cfg.num_tasks or max(1, int(ray.available_resources().get("CPU", 1))), n_batches)
    say(f"links {name}: {n} works in {len(targets)} collections ({', '.join(targets)}); top-{cfg.k} per "
        f"{'collection' if cfg.include_own_collection else 'other collection'}; {n_batches} batches on {n_tasks} "
        f"Ray tasks")

    batches = [(b, object_ids[b * cfg.batch_size:(b + 1) * cfg.batch_size],
                collections[b * cfg.batch_size:(b + 1) * cfg.batch_size]) for b in range(n_batches)]
    per_task = [batches[t::n_tasks] for t in range(n_tasks)]
    progress = Progress(f"links {name}", total=n, unit="works", interval=5.0)
    totals: dict = defaultdict(lambda: [0, 0.0])
    n_links = 0
    with storage.atomic_dir(out_uri) as staging:
        links_task = ray.remote(_links_task_body)
        pending = [links_task.remote(index_uri, staging, ctx.config.storage, work, targets, cfg.k,
                                     cfg.include_own_collection) for work in per_task]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for result in ray.get(done):
                n_links += result["links"]
                for pair, (count, score_sum) in result["pairs"].items():
                    totals[pair][0] += count
                    totals[pair][1] += score_sum
                progress.update(result["works"])
    seconds = time.perf_counter() - started
    rows = [(a, b, count, f"{score_sum / max(count, 1):.3f}") for (a, b), (count, score_sum) in sorted(totals.items())]
    table(["from", "to", "links", "mean score"], rows)
    say(f"links {name}: {n} works, {n_links} links in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} works/s); "
        f"written to {out_uri}")
    return {"links_uri": out_uri, "name": name, "works": n, "links": n_links, "collections": targets,
            "k": cfg.k, "include_own_collection": cfg.include_own_collection,
            "pairs": {f"{a}->{b}": {"links": c, "mean_score": round(s / max(c, 1), 4)}
                      for (a, b), (c, s) in sorted(totals.items())},
            "seconds": round(seconds, 2), "works_per_second": round(n / max(seconds, 1e-9), 1),
            "index_vectors": manifest["ntotal"]}


def _node_cache_dir(index_uri: str) -> Optional[str]:
    """Remote indexes are cached once per node (content-addressed files, safe for concurrent tasks)."""
    from artsim.storage import is_s3

    return os.path.join(tempfile.gettempdir(), "artsim-index-cache") if is_s3(index_uri) else None


def _links_task_body(index_uri: str, staging: str, storage_config, batches, targets, k: int, include_own: bool
                     ) -> dict:
    from artsim.serving import ShardedIndex

    storage = Storage(storage_config)
    index = ShardedIndex.open(index_uri, cache_dir=_node_cache_dir(index_uri), storage=storage)
    try:
        collection_of = {}
        works = links = 0
        pairs: Counter = Counter()
        pair_scores: Counter = Counter()
        for batch_no, object_ids, collections in batches:
            part = links_for_batch(index, object_ids, collections, targets, k, include_own)
            storage.write_parquet_file(part, join(staging, f"part-{batch_no:05d}.parquet"))
            collection_of.update(zip(object_ids, collections))
            for pair, (count, score_sum) in pair_stats(part, collection_of).items():
                pairs[pair] += count
                pair_scores[pair] += score_sum
            works += len(object_ids)
            links += part.num_rows
        return {"works": works, "links": links,
                "pairs": {pair: (pairs[pair], pair_scores[pair]) for pair in pairs}}
    finally:
        index.close()

