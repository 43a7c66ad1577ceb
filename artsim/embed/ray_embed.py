"""The embed stage's Ray layer: images/ -> decode/resize (CPU tasks) -> model (actor pool) -> embeddings/<key>/.

    read_parquet(images/, status == ok) ─► map_batches(preprocess_batch)          Ray tasks, CPU, no torch
                                        ─► map_batches(EmbedWorker, ActorPool)    model replicas (CPU or GPU)
                                        ─► driver: EmbeddingWriter                streams Parquet + _model.json

Ray Data's streaming executor bounds memory whatever the collection size (blocks flow through; nothing is
materialised). The driver writes the (small) vectors itself so that it can count failures exactly, print progress,
and finish the directory atomically: `_SUCCESS` is written only after every row (see Storage.atomic_dir).

The pieces (`EmbedWorker`, `EmbeddingWriter`, `describe_bottleneck`) are plain classes/functions, tested without Ray.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from artsim.config import EmbedConfig, StorageConfig
from artsim.console import Progress, say
from artsim.errors import ArtsimError, ConfigError
from artsim.rundir.embeddings import EmbeddingWriter, embeddings_schema
from artsim.storage import Storage, join

# Row groups of about this many rows keep Parquet readers efficient without holding much in the driver.
# Failed images listed by id in _report.json (the counts are always complete).
MAX_REPORTED_FAILURES = 1000


def default_torch_threads(embed_cfg: EmbedConfig) -> int:
    """Intra-op threads for one CPU actor: this node's cores shared by the actors.

    Deliberately more than the Ray CPUs an actor reserves (cpus_per_actor): decode/resize tasks are cheap next to
    the model, and a model that only uses 1 of 2 cores would halve throughput on small machines.
    """
    if embed_cfg.torch_threads is not None:
        return embed_cfg.torch_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // embed_cfg.num_actors)


class EmbedWorker:
    """One model replica: a batch of preprocessed pixels -> L2-normalised vectors (an actor in the pool).

    The model is rebuilt from the config in each actor (random init is seeded, artifacts are verified by sha256);
    ``expected_weights_id`` makes sure every replica computes with the weights the driver recorded.
    """

    def __init__(self, embed_cfg: EmbedConfig, storage_cfg: StorageConfig, expected_weights_id: Optional[str] = None,
                 torch_threads: Optional[int] = None):
        import torch

        from artsim.models.embedder import build_embedder

        self.cfg = embed_cfg
        start = time.perf_counter()
        use_gpu = embed_cfg.num_gpus > 0
        if use_gpu and not torch.cuda.is_available():
            raise ArtsimError("embed.num_gpus > 0 but this Ray worker sees no CUDA device")
        if not use_gpu:
            torch.set_num_threads(torch_threads or default_torch_threads(embed_cfg))
        embedder = build_embedder(embed_cfg, Storage(storage_cfg))
        if expected_weights_id is not None and embedder.weights_id != expected_weights_id:
            raise ArtsimError(f"model replica loaded weights {embedder.weights_id}, expected {expected_weights_id} "
                              f"(the weights changed while the job ran?)")
        if use_gpu:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
            embedder = embedder.to("cuda", memory_format=torch.channels_last)
        self.embedder = embedder
        self.precision = embed_cfg.precision if use_gpu else "fp32"
        self.out_dtype = np.float16 if embed_cfg.dtype == "float16" else np.float32
        self.load_s = time.perf_counter() - start

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        errors = batch["error"]
        ok = np.asarray([not e for e in errors], dtype=bool)
        n = len(errors)
        vectors = np.zeros((n, self.embedder.spec.output_dim), dtype=self.out_dtype)
        if ok.any():  # failed rows keep a zero vector and are dropped by the writer
            vectors[ok] = self.embedder.embed_pixels(batch["pixels"][ok], self.precision).astype(self.out_dtype)
        elapsed = time.perf_counter() - start
        return {"object_id": batch["object_id"], "embedding": vectors, "error": errors,
                "prep_s": batch["prep_s"], "model_s": np.full(n, elapsed / max(n, 1))}


def describe_bottleneck(wall_s: float, model_s: float, prep_s: float, num_actors: int) -> tuple[str, dict]:
    """Which stage bounded throughput, from the busy time each side reported (seconds summed over batches)."""
    wall_s = max(wall_s, 1e-9)
    model_busy = model_s / (num_actors * wall_s)  # fraction of the time the model replicas were computing
    prep_parallel = prep_s / wall_s  # average number of decode/resize tasks busy at once
    numbers = {"model_busy_fraction": round(model_busy, 3), "preprocess_busy_workers": round(prep_parallel, 3)}
    if model_busy >= 0.75:
        verdict = (f"bounded by the model: the {num_actors} model actor(s) computed {model_busy:.0%} of the time "
                   f"(more actors/GPUs or a smaller model would go faster)")
    elif prep_parallel >= 0.75 * max(1.0, model_busy * num_actors):
        verdict = (f"bounded by preprocessing: model actors idle {1 - model_busy:.0%} of the time while "
                   f"{prep_parallel:.1f} decode/resize tasks were busy on average (give it more CPUs)")
    else:
        verdict = (f"bounded by reading/scheduling: model actors idle {1 - model_busy:.0%}, preprocessing "
                   f"{prep_parallel:.1f} workers busy (startup dominates small runs)")
    return verdict, numbers


def _check_resources(cfg: EmbedConfig) -> None:
    """Fail with a clear message instead of waiting forever for resources the cluster does not have."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if cfg.num_gpus > 0 and gpus < cfg.num_gpus:
        raise ConfigError("embed.num_gpus", f"{cfg.num_gpus} per actor, but the Ray cluster has {gpus:g} GPUs")
    from artsim.runtime import fit_task

    # one actor lives on one node: its CPUs and GPUs must fit one node, not the cluster's total
    key = "embed.num_gpus" if cfg.num_gpus else "embed.cpus_per_actor"
    fit_task(want_cpus=cfg.cpus_per_actor, min_cpus=cfg.cpus_per_actor, gpus=cfg.num_gpus, what="an embed model actor",
             key=key)
    actor_cpus = cfg.cpus_per_actor
    if actor_cpus * cfg.num_actors > cpus - 1:
        raise ConfigError("embed.num_actors", f"{cfg.num_actors} actors x {actor_cpus:g} CPUs leave no CPU for "
                                              f"preprocessing (the Ray cluster has {cpus:g} CPUs)")


def run_embed(ctx, **_options) -> dict:
    """images/ -> embeddings/<model_key>/ (+ _model.json, _report.json); returns the stage summary."""
    import ray
    from ray.data.expressions import col

    from artsim.models.embedder import describe_model, model_description
    from artsim.rundir.names import model_key
    from artsim.models.preprocess import preprocess_batch

    cfg: EmbedConfig = ctx.config.embed
    storage: Storage = ctx.storage
    images_uri = ctx.paths.images
    if not storage.exists(images_uri):
        raise ArtsimError(f"{images_uri}: not found (run the download stage first)")
    if not storage.is_complete(images_uri):
        raise ArtsimError(f"{images_uri}: incomplete output (no _SUCCESS marker); re-run the download stage")

    # Resolve the model here (shapes only, no weights built): bad names, missing or tampered artifacts and
    # unreachable weights fail before any Ray work starts. Each replica builds the real network.
    spec, weights_id = describe_model(cfg, storage)
    key = model_key(cfg)
    out_uri = ctx.paths.embeddings(key)
    model_info = model_description(key, spec, weights_id, cfg.weights, cfg.seed) | {
        "dtype": cfg.dtype, "precision": cfg.precision if cfg.num_gpus else "fp32"}

    statuses = storage.read_table(images_uri, columns=["status"]).column("status")  # one small column
    n_input, n_ok = len(statuses), int(pc.sum(pc.equal(statuses, "ok")).as_py() or 0)
    say(f"embed: {n_ok} ok images of {n_input} records -> {out_uri} ({key}, {spec.output_dim}-d {cfg.dtype}, "
        f"weights {model_info['weights_id']})")

    _check_resources(cfg)
    threads = default_torch_threads(cfg)
    start = time.perf_counter()
    first_result_at: Optional[float] = None  # steady-state rate: rows after the first batch / time after it
    last_result_at = start
    first_batch_rows = 0
    model_s = prep_s = 0.0
    progress = Progress("embed", total=n_ok, unit="images", interval=5.0)
    with storage.atomic_dir(out_uri) as staging:
        writer = EmbeddingWriter(storage, staging, key, spec.output_dim, cfg.dtype, cfg.rows_per_file)
        if n_ok:
            fs, path = storage.arrow_fs(images_uri)
            # Enough blocks that decoding, the model and writing overlap even when images/ is one big file.
            blocks = max(1, min(2000, -(-n_ok // (cfg.batch_size * 2))))
            ds = ray.data.read_parquet(path, filesystem=fs, columns=["object_id", "status", "image"],
                                       override_num_blocks=blocks)
            ds = ds.filter(expr=col("status") == "ok")
            prep_compute = (ray.data.TaskPoolStrategy(size=cfg.preprocess_concurrency)
                            if cfg.preprocess_concurrency else None)
            # The memory hint (interpreter + pyarrow: 150-240 MiB measured, plus decoded images and pixels) also
            # keeps Ray from fusing these tasks into the model actors (it fuses ops whose resource requests are
            # equal): decoding must overlap with the model, not run in the actor's thread between batches.
            prep_memory = 256 * 2**20 + cfg.batch_size * 3 * (spec.image_size**2 + 4 * spec.resize_size**2)
            ds = ds.map_batches(preprocess_batch, batch_size=cfg.batch_size, batch_format="numpy",
                                fn_kwargs={"resize_size": spec.resize_size, "crop_size": spec.image_size},
                                num_cpus=1, memory=prep_memory, compute=prep_compute)
            # One block per model batch: actors start on the first batch instead of waiting for a whole read
            # block, and several actors share a small input.
            ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
            ds = ds.map_batches(
                EmbedWorker, batch_size=cfg.batch_size, batch_format="numpy",
                fn_constructor_kwargs={"embed_cfg": cfg, "storage_cfg": ctx.config.storage,
                                       "expected_weights_id": model_info["weights_id"], "torch_threads": threads},
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_gpus=cfg.num_gpus or None, num_cpus=cfg.cpus_per_actor)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                last_result_at = time.perf_counter()
                if first_result_at is None:
                    first_result_at, first_batch_rows = last_result_at, len(batch["object_id"])
                writer.add(batch["object_id"], batch["embedding"], batch["error"])
                model_s += float(np.sum(batch["model_s"]))
                prep_s += float(np.sum(batch["prep_s"]))
                progress.update(len(batch["object_id"]), extra=f"({writer.failed} failed)" if writer.failed else "")
        writer.close()
        wall = time.perf_counter() - start
        verdict, busy = describe_bottleneck(wall, model_s, prep_s, cfg.num_actors)
        report = {"model_key": key, "input_records": n_input, "ok_images": n_ok, "embedded": writer.written,
                  "decode_errors": writer.failed, "failures": writer.failures,
                  "failures_truncated": writer.failed > len(writer.failures)}
        storage.write_json(join(staging, "_model.json"), model_info)
        storage.write_json(join(staging, "_report.json"), report)
    rate = writer.written / max(wall, 1e-9)
    after_first = progress.done - first_batch_rows
    steady = (after_first / (last_result_at - first_result_at)) if first_result_at and after_first else 0.0
    startup = (first_result_at - start) if first_result_at else 0.0
    say(f"embed: done: {writer.written} embedded, {writer.failed} could not be decoded, "
        f"{n_input - n_ok} skipped (download status not ok) in {wall:.1f}s = {rate:.1f} images/s "
        f"(first batch after {startup:.1f}s, then {steady:.1f}/s; {cfg.num_actors} actor(s), "
        f"batch {cfg.batch_size}, "
        f"{'GPU ' + cfg.precision if cfg.num_gpus else f'CPU {threads} threads/actor'})")
    say(f"embed: {verdict}")
    say(f"embed: wrote {out_uri} ({len(writer.files)} file(s), _model.json, _report.json)")
    return {"model_key": key, "output": out_uri, "weights_id": model_info["weights_id"], "dim": spec.output_dim,
            "dtype": cfg.dtype, "input_records": n_input, "skipped_not_ok": n_input - n_ok,
            "embedded": writer.written, "decode_errors": writer.failed, "seconds": round(wall, 2),
            "images_per_s": round(rate, 2), "steady_images_per_s": round(steady, 2),
            "first_batch_s": round(startup, 2), "bottleneck": verdict,
            "model_busy_s": round(model_s, 2), "preprocess_busy_s": round(prep_s, 2), **busy}


__all__ = ["EmbedWorker", "EmbeddingWriter", "describe_bottleneck", "embeddings_schema", "run_embed"]
