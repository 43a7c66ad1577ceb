"""The Ray layer of an index build: scan tasks read the vectors to find the good rows and the sampled ones, then
a ``BuildPlan`` is carried out — train (on a GPU when the cluster has one), one task per shard (read its rows in
batches, add, write, exact top-10 of the tuning queries), tune. Each task reads its own vectors from storage; the
driver only passes plans, masks and small results."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from artsim.console import Progress, say
from artsim.index.plan import BuildPlan, SamplingPlan, rows_in
from artsim.storage import join

log = logging.getLogger("artsim.index")


@dataclass
class ScanOutcome:
    good_refs: list  # per piece: an object-store ref to its rows' good-vector bits (np.packbits), for the plan task
    good_rows: int  # rows holding a usable vector (object ids are checked by the plan)
    off_norm: int  # good vectors that were not unit length (normalised wherever they are read)
    query_vectors: np.ndarray  # the vectors of the query candidates, in order
    train_refs: list  # per piece: an object-store ref to its training candidates' vectors
    seconds: float


def max_dim(pieces, storage_config) -> int:
    """The longest vector of variable-length list embeddings (one more read of the vectors)."""
    import ray

    from artsim.index.ray_tasks import max_length_task

    return max(ray.get([max_length_task.remote(p, storage_config) for p in pieces]))


def scan(name: str, pieces, dim: int, sampling: SamplingPlan, storage_config, batch_rows: int) -> ScanOutcome:
    """One task per piece: which rows hold a good vector, and the sampled rows' vectors (training ones and the
    good-row bits stay in the object store)."""
    import ray

    from artsim.index.ray_tasks import scan_task

    t0 = time.perf_counter()
    pending = {}
    for i, piece in enumerate(pieces):
        summary_ref, good_ref, query_ref, train_ref = scan_task.remote(
            piece, dim, rows_in(sampling.query_candidates, piece), rows_in(sampling.train_candidates, piece),
            storage_config, batch_rows)
        pending[summary_ref] = (i, good_ref, query_ref, train_ref)
    progress = Progress(f"index {name}: scanning", total=len(pieces), unit="pieces", interval=5.0)
    scans: list = [None] * len(pieces)
    refs = list(pending)
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        i, good_ref, query_ref, train_ref = pending.pop(done[0])
        scans[i] = (ray.get(done[0]), good_ref, ray.get(query_ref), train_ref)
        progress.update(1, f"({pieces[i].num_rows} rows)")
    off_norm = sum(s["off_norm"] for s, _, _, _ in scans)
    if off_norm:
        log.warning("embeddings: %d vectors were not L2-normalised; normalising them", off_norm)
    return ScanOutcome([g for _, g, _, _ in scans], sum(s["good_rows"] for s, _, _, _ in scans), off_norm,
                       np.concatenate([q for _, _, q, _ in scans]), [t for _, _, _, t in scans],
                       time.perf_counter() - t0)


def make_plan(cfg, plan_args: dict, scanned: ScanOutcome, storage_config, records_uri: Optional[str],
              previous_manifest: Optional[dict]) -> tuple[BuildPlan, list, object]:
    """Run the plan task (``ray_tasks.plan_task``); returns (the plan without its per-row parts, one object ref
    per shard's ShardPlan, the ref of ids.parquet's bytes). Nothing per row comes to the driver."""
    import ray

    from artsim.index.ray_tasks import plan_task

    refs = plan_task.options(num_returns=2 + cfg.num_shards).remote(
        cfg, storage_config, plan_args, scanned.good_refs, records_uri, previous_manifest, cfg.num_shards)
    try:
        plan = get_unwrapped(refs[0])
    except Exception:
        for ref in refs[1:]:  # the same error in every return: read here, so that Ray does not log it as unhandled
            try:
                ray.get(ref)
            except Exception:
                pass
        raise
    scanned.good_refs = []  # the plan task has read them; they leave the object store
    return plan, refs[2:2 + len(plan.shard_sizes)], refs[1]


def get_unwrapped(ref):
    """ray.get, with an artsim error raised in a task re-raised as itself (a clear message, not a Ray trace)."""
    import ray

    from artsim.errors import ArtsimError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ArtsimError):
            raise exc.cause from None
        raise


@dataclass
class BuildResult:
    shard_entries: list  # manifest entries {path, ntotal, sha256, bytes} per shard
    tuning: dict  # search params, recall@10, latency
    use_gpu: bool
    train_seconds: float
    add_seconds: float
    tune_seconds: float


def execute(plan: BuildPlan, shards: list, scanned: ScanOutcome, storage_config, target_recall: float,
            batch_rows: int) -> BuildResult:
    """Train, build and write every shard (``shards``: their ShardPlans or object refs to them, from
    ``make_plan``), tune; nothing is published (see ``artsim.index.publish``)."""
    import ray

    from artsim.index.ray_tasks import shard_task, train_task, tune_task
    from artsim.serving.topk import RECALL_K, merge_topk

    from artsim.runtime import fit_task, largest_node, node_shapes

    use_gpu = largest_node(node_shapes())[1] >= 1  # a GPU task needs a node that has one, not GPUs anywhere
    # one task, so one node: at most 8 threads, at most what the largest (GPU) node has
    threads = int(fit_task(want_cpus=8, gpus=1 if use_gpu else 0, what="index training (one task)", key="index"))
    t0 = time.perf_counter()
    train_refs = [scanned.train_refs[i] for i in plan.train_pieces]
    trained = ray.get(train_task.options(num_cpus=threads, num_gpus=1 if use_gpu else 0).remote(
        plan.index.factory, plan.dim, train_refs, plan.train_masks, use_gpu, threads))
    del train_refs  # the training candidates leave the object store
    scanned.train_refs = []
    train_seconds = time.perf_counter() - t0
    if plan.index.kind != "flat":
        say(f"index {plan.name}: trained on {plan.n_train} vectors in {train_seconds:.1f} s"
            f"{' (GPU)' if use_gpu else ''}")

    num_shards = len(shards)
    trained_ref, queries_ref = ray.put(trained), ray.put(plan.queries)
    pending = {}
    for s, shard_plan in enumerate(shards):
        rel = f"shards/{plan.build_id}/shard-{s:05d}-of-{num_shards:05d}.faiss"
        ref = shard_task.remote(trained_ref, shard_plan, plan.dim, join(plan.index_uri, rel), storage_config,
                                queries_ref, batch_rows)
        pending[ref] = (s, rel)
    progress = Progress(f"index {plan.name}: shards", total=num_shards, unit="shards", interval=5.0)
    shard_entries: list[Optional[dict]] = [None] * num_shards
    truths = []
    t0 = time.perf_counter()
    refs = list(pending)
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        result = ray.get(done[0])
        s, rel = pending[done[0]]
        shard_entries[s] = {"path": rel, "ntotal": result["ntotal"], "sha256": result["sha256"],
                            "bytes": result["bytes"]}
        truths.append((result["truth_scores"], result["truth_ids"]))
        progress.update(1, f"(shard {s}: {result['ntotal']} vectors, {result['add_seconds']:.1f} s)")
    add_seconds = time.perf_counter() - t0

    _, truth_ids = merge_topk(truths, RECALL_K)
    t0 = time.perf_counter()
    tuning = ray.get(tune_task.options(num_cpus=threads).remote(
        plan.index_uri, shard_entries, storage_config, queries_ref, truth_ids, target_recall, threads))
    return BuildResult(shard_entries, tuning, use_gpu, train_seconds, add_seconds, time.perf_counter() - t0)
