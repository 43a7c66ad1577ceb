"""The embed stage's Ray layer: images/ -> decode/resize (CPU tasks) -> model (actor pool) -> embeddings/<key>/.

    plan_files (Ray tasks, per group of images/ files) ─► which files have ok images without a vector
    from_items(those files) ─► map_batches(read_pending)            Ray tasks: ok rows without a vector
                            ─► map_batches(preprocess)              Ray tasks, CPU, no torch
                            ─► map_batches(EmbedWorker, ActorPool)  model replicas (CPU or GPU)
                            ─► map_batches(write_parts)             Ray tasks: part files, written atomically
                            ─► driver: counts only (progress, report)

The workers write the vectors: each writer batch becomes one part file per images/ file its rows came from,
``part-<images file stem>-<digest of its ids>.parquet`` (rundir.embeddings.part_name), in one atomic write. Output
already committed is kept: a re-run (after a kill, or after the download added images) embeds only the ok images of
each images/ file that no part of that file holds. ``_model.json`` and ``_SUCCESS`` are written when every ok image
has a vector or a decode error; until then ``_in_progress.json`` names the model that the parts were computed with.
A different model (weights_id, dimension, preprocessing, dtype) never mixes with them: the directory starts over.

The pieces (`EmbedWorker`, `read_pending`, `write_parts`, `plan_files`, `describe_bottleneck`) are plain
functions/classes, tested without Ray.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artsim.config import EmbedConfig, StorageConfig
from artsim.console import Progress, say
from artsim.errors import ArtsimError, ConfigError
from artsim.rundir.embeddings import (EmbeddingWriter, embeddings_schema, source_of_part,
                                      write_embedding_part)
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
        embedder = build_embedder(embed_cfg, Storage(storage_cfg), with_text=False)  # images only: no text tower
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
        out = {"object_id": batch["object_id"], "embedding": vectors, "error": errors,
               "prep_s": batch["prep_s"], "model_s": np.full(n, elapsed / max(n, 1))}
        if "source" in batch:  # which images/ file each row came from (names its part file)
            out["source"] = batch["source"]
        return out


# ------------------------------------------------------------------------------------ resume: what is left to embed

IN_PROGRESS = "_in_progress.json"
# What makes two vectors comparable: a difference in any of these is another model, whatever the directory's name.
MODEL_FIELDS = ("backbone", "weights_id", "output_dim", "image_size", "resize_size", "mean", "std", "dtype")
FILES_PER_PLAN_TASK = 64


def _stem(name: str) -> str:
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def keep_or_start_over(storage: Storage, out_uri: str, model_info: dict, image_files: list[str]
                       ) -> tuple[dict[str, list[str]], Optional[str]]:
    """What of an existing embeddings/<key>/ is kept: ({images file stem: its part names}, why it started over).

    Starts over (deletes the directory) when its parts were computed with another model (MODEL_FIELDS of
    ``_model.json`` or ``_in_progress.json``), when parts exist without either file, or when parts use another
    layout (an older artsim's ``part-00000.parquet``). Parts of an images/ file that no longer exists are removed,
    and so are temporaries of killed writes."""
    names = storage.list(out_uri)
    parts = [n for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]
    recorded = None
    for marker in ("_model.json", IN_PROGRESS):
        if marker in names:
            recorded = storage.read_json(join(out_uri, marker))
            break
    reason = None
    if recorded is not None:
        changed = [f for f in MODEL_FIELDS if recorded.get(f) != model_info.get(f)]
        if changed:
            reason = ("its vectors were computed with another model (" + ", ".join(
                f"{f}: {recorded.get(f)!r} -> {model_info.get(f)!r}" for f in changed) + ")")
    elif parts:
        reason = "it holds part files but no _model.json / _in_progress.json saying which model wrote them"
    if reason is None and any(source_of_part(n) is None for n in parts):
        reason = "its part files are of an older layout (not named after their images/ file)"
    if reason is not None:
        storage.delete(out_uri)
        return {}, reason
    for name in names:
        if name.startswith(".") and ".tmp-" in name:
            storage.delete(join(out_uri, name))
    stems = {_stem(n) for n in image_files}
    by_stem: dict[str, list[str]] = {}
    for name in parts:
        stem = source_of_part(name)
        if stem in stems:
            by_stem.setdefault(stem, []).append(name)
        else:
            storage.delete(join(out_uri, name))  # its images/ file is gone: so are its images
    return by_stem, None


def _ok_ids(storage: Storage, images_uri: str, file_name: str) -> tuple[pa.Array, int]:
    """The ok images' ids of one images/ file, and its number of rows."""
    table = storage.read_table(join(images_uri, file_name), columns=["object_id", "status"])
    ids = table.filter(pc.equal(table.column("status"), "ok")).column("object_id")
    return ids.filter(pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False)).combine_chunks(), table.num_rows


def _part_ids(storage: Storage, out_uri: str, parts: list[str]) -> pa.Array:
    arrays = [storage.read_table(join(out_uri, p), columns=["object_id"]).column("object_id").combine_chunks()
              for p in parts]
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())


def plan_files(storage: Storage, images_uri: str, out_uri: str, files: list[tuple[str, list[str]]]) -> dict:
    """A group of images/ files with their parts -> counts, and the files that still have ok images without a
    vector (with the parts kept). A part holding an id that is not an ok image of its file (images/ was rebuilt)
    is removed; its other ids are embedded again."""
    out = {"rows": 0, "ok": 0, "done": 0, "stale_parts": 0, "pending": []}
    for name, parts in files:
        ok, rows = _ok_ids(storage, images_uri, name)
        out["rows"] += rows
        kept = []
        for part in parts:
            ids = _part_ids(storage, out_uri, [part])
            if len(ids) and not pc.all(pc.is_in(ids, value_set=ok)).as_py():
                storage.delete(join(out_uri, part))
                out["stale_parts"] += 1
            else:
                kept.append(part)
        done = pc.sum(pc.is_in(ok, value_set=_part_ids(storage, out_uri, kept))).as_py() or 0
        out["ok"] += len(ok)
        out["done"] += done
        if len(ok) > done:
            out["pending"].append({"file": name, "parts": json.dumps(kept), "pending": len(ok) - done})
    return out


def read_pending(batch: pa.Table, storage_cfg: StorageConfig, images_uri: str, out_uri: str) -> pa.Table:
    """Ray Data batch of work items (file, parts) -> the ok rows of those images/ files that no part holds, with
    ``source`` = the file's stem."""
    storage = Storage(storage_cfg)
    tables = []
    for name, parts in zip(batch.column("file").to_pylist(), batch.column("parts").to_pylist()):
        table = storage.read_table(join(images_uri, name), columns=["object_id", "status", "image"])
        table = table.filter(pc.equal(table.column("status"), "ok"))
        table = table.filter(pc.fill_null(pc.greater(pc.utf8_length(table.column("object_id")), 0), False))
        done = _part_ids(storage, out_uri, json.loads(parts))
        if len(done):
            table = table.filter(pc.invert(pc.is_in(table.column("object_id"), value_set=done)))
        tables.append(table.select(["object_id", "image"]).append_column(
            "source", pa.array([_stem(name)] * table.num_rows, pa.string())))
    if not tables:
        return pa.table({"object_id": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                         "source": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def preprocess_rows(batch: dict, resize_size: int, crop_size: int) -> dict:
    """preprocess_batch, keeping each row's ``source``."""
    from artsim.models.preprocess import preprocess_batch

    out = preprocess_batch(batch, resize_size, crop_size)
    out["source"] = np.asarray(batch["source"], dtype=object)
    return out


def write_parts(batch: dict, storage_cfg: StorageConfig, out_uri: str, model_name: str, dim: int, dtype: str
                ) -> dict:
    """A batch of vectors -> one part file per images/ file its rows came from (decode failures are not written,
    only counted); returns one row of counts for the driver."""
    storage = Storage(storage_cfg)
    errors = ["" if e is None else str(e) for e in batch["error"]]
    sources = [str(s) for s in batch["source"]]
    ids = [str(o) for o in batch["object_id"]]
    rows_by_source: dict[str, list[int]] = {}
    failures = []
    for i, (source, err) in enumerate(zip(sources, errors)):
        if err:
            if len(failures) < MAX_REPORTED_FAILURES:
                failures.append({"object_id": ids[i], "error": err})
        else:
            rows_by_source.setdefault(source, []).append(i)
    written = 0
    for source, rows in sorted(rows_by_source.items()):
        write_embedding_part(storage, out_uri, source, [ids[i] for i in rows], batch["embedding"][rows],
                             model_name, dim, dtype)
        written += len(rows)
    return {"written": np.array([written]), "failed": np.array([sum(1 for e in errors if e)]),
            "failures": np.array([json.dumps(failures)], dtype=object), "files": np.array([len(rows_by_source)]),
            "model_s": np.array([float(np.sum(batch["model_s"]))]),
            "prep_s": np.array([float(np.sum(batch["prep_s"]))])}


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
    """images/ -> embeddings/<model_key>/ (+ _model.json, _report.json), resuming committed parts; returns the
    stage summary."""
    import ray

    from artsim.models.embedder import describe_model, model_description
    from artsim.rundir.names import model_key
    from artsim.runtime import ensure_ray
    from artsim.storage import SUCCESS

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

    ensure_ray(ctx.config)
    _check_resources(cfg)
    image_files = [n for n in storage.list(images_uri) if n.endswith(".parquet") and not n.startswith((".", "_"))]
    parts_of, started_over = keep_or_start_over(storage, out_uri, model_info, image_files)
    if started_over:
        say(f"embed: starting {out_uri} over: {started_over}; its old vectors were deleted")
    storage.delete(join(out_uri, SUCCESS))  # being extended: not complete (nor described) until every image is in
    storage.delete(join(out_uri, "_model.json"))
    storage.write_json(join(out_uri, IN_PROGRESS), model_info)

    # Which images/ files have ok images without a vector: Ray tasks over groups of files (counts come back).
    plan_task = ray.remote(num_cpus=1)(plan_files)
    groups = [image_files[i:i + FILES_PER_PLAN_TASK] for i in range(0, len(image_files), FILES_PER_PLAN_TASK)]
    planned = ray.get([plan_task.remote(storage, images_uri, out_uri, [(n, parts_of.get(_stem(n), [])) for n in g])
                       for g in groups])
    n_input = sum(p["rows"] for p in planned)
    n_ok = sum(p["ok"] for p in planned)
    done_before = sum(p["done"] for p in planned)
    work = [item for p in planned for item in p["pending"]]
    pending = sum(item["pending"] for item in work)
    stale = sum(p["stale_parts"] for p in planned)
    say(f"embed: {n_ok} ok images, {done_before} already embedded, {pending} to embed -> {out_uri} ({key}, "
        f"{spec.output_dim}-d {cfg.dtype}, weights {model_info['weights_id']})"
        + (f"; {stale} part file(s) of images no longer in images/ removed" if stale else ""))

    threads = default_torch_threads(cfg)
    start = time.perf_counter()
    first_result_at: Optional[float] = None  # steady-state rate: rows after the first batch / time after it
    last_result_at = start
    first_batch_rows = 0
    model_s = prep_s = 0.0
    written = failed = files = 0
    failures: list[dict] = []
    progress = Progress("embed", total=pending, unit="images", interval=5.0)
    if work:
        ds = ray.data.from_items([{"file": w["file"], "parts": w["parts"]} for w in work],
                                 override_num_blocks=min(len(work), 2000))
        ds = ds.map_batches(read_pending, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"storage_cfg": ctx.config.storage, "images_uri": images_uri,
                                       "out_uri": out_uri}, num_cpus=1)
        prep_compute = (ray.data.TaskPoolStrategy(size=cfg.preprocess_concurrency)
                        if cfg.preprocess_concurrency else None)
        # The memory hint (interpreter + pyarrow: 150-240 MiB measured, plus decoded images and pixels) also
        # keeps Ray from fusing these tasks into the model actors (it fuses ops whose resource requests are
        # equal): decoding must overlap with the model, not run in the actor's thread between batches.
        prep_memory = 256 * 2**20 + cfg.batch_size * 3 * (spec.image_size**2 + 4 * spec.resize_size**2)
        ds = ds.map_batches(preprocess_rows, batch_size=cfg.batch_size, batch_format="numpy",
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
        # Part files of up to write_rows rows (fewer when a batch spans several images/ files): a kill loses at
        # most the batches in flight.
        write_rows = max(cfg.batch_size, min(cfg.rows_per_file, 4096))
        ds = ds.map_batches(write_parts, batch_size=write_rows, batch_format="numpy",
                            fn_kwargs={"storage_cfg": ctx.config.storage, "out_uri": out_uri, "model_name": key,
                                       "dim": spec.output_dim, "dtype": cfg.dtype}, num_cpus=0.25)
        for row in ds.iter_rows():
            last_result_at = time.perf_counter()
            n = int(row["written"]) + int(row["failed"])
            if first_result_at is None:
                first_result_at, first_batch_rows = last_result_at, n
            written += int(row["written"])
            failed += int(row["failed"])
            files += int(row["files"])
            failures.extend(json.loads(row["failures"])[: MAX_REPORTED_FAILURES - len(failures)])
            model_s += float(row["model_s"])
            prep_s += float(row["prep_s"])
            progress.update(n, extra=f"({failed} failed)" if failed else "")
    wall = time.perf_counter() - start
    if written + failed != pending:
        raise ArtsimError(f"embed: {pending - written - failed} of {pending} images came back neither embedded nor "
                          f"failed; {written} were committed, re-run to embed the rest")
    verdict, busy = describe_bottleneck(wall, model_s, prep_s, cfg.num_actors)
    embedded = done_before + written
    report = {"model_key": key, "input_records": n_input, "ok_images": n_ok, "embedded": embedded,
              "embedded_this_run": written, "already_embedded": done_before, "decode_errors": failed,
              "failures": failures, "failures_truncated": failed > len(failures), "started_over": started_over,
              "stale_parts_removed": stale}
    storage.write_json(join(out_uri, "_report.json"), report)
    storage.write_json(join(out_uri, "_model.json"), model_info)
    storage.delete(join(out_uri, IN_PROGRESS))
    storage.write_bytes(join(out_uri, SUCCESS), b"")
    rate = written / max(wall, 1e-9)
    after_first = progress.done - first_batch_rows
    steady = (after_first / (last_result_at - first_result_at)) if first_result_at and after_first else 0.0
    startup = (first_result_at - start) if first_result_at else 0.0
    say(f"embed: done: {written} embedded this run ({done_before} before), {failed} could not be decoded, "
        f"{n_input - n_ok} skipped (download status not ok) in {wall:.1f}s = {rate:.1f} images/s "
        f"(first batch after {startup:.1f}s, then {steady:.1f}/s; {cfg.num_actors} actor(s), "
        f"batch {cfg.batch_size}, "
        f"{'GPU ' + cfg.precision if cfg.num_gpus else f'CPU {threads} threads/actor'})")
    say(f"embed: {verdict}")
    say(f"embed: wrote {out_uri} ({files} part file(s) this run, _model.json, _report.json)")
    return {"model_key": key, "output": out_uri, "weights_id": model_info["weights_id"], "dim": spec.output_dim,
            "dtype": cfg.dtype, "input_records": n_input, "skipped_not_ok": n_input - n_ok,
            "embedded": embedded, "embedded_this_run": written, "already_embedded": done_before,
            "decode_errors": failed, "started_over": started_over, "seconds": round(wall, 2),
            "images_per_s": round(rate, 2), "steady_images_per_s": round(steady, 2),
            "first_batch_s": round(startup, 2), "bottleneck": verdict,
            "model_busy_s": round(model_s, 2), "preprocess_busy_s": round(prep_s, 2), **busy}


__all__ = ["EmbedWorker", "EmbeddingWriter", "describe_bottleneck", "embeddings_schema", "keep_or_start_over",
           "plan_files", "read_pending", "write_parts", "run_embed"]
