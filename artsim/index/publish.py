"""Publishing an index build: the previous build's id map (for stable ids), then ids.parquet and, last,
manifest.json — readers see a new build only once its manifest is written. Shards live under
shards/<build_id>/, so a reader holding the previous manifest keeps reading the previous build's shards; builds
older than the previous one are deleted."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from typing import Optional

from artsim.errors import IntegrityError
from artsim.index.execute import BuildResult
from artsim.index.plan import BuildPlan
from artsim.rundir.index_manifest import FORMAT, IDS, MANIFEST, METRIC, validate_manifest
from artsim.storage import Storage, join


def load_previous_manifest(storage: Storage, index_uri: str) -> Optional[dict]:
    """The previous build's manifest, validated, or None when there is none (small: the driver reads it)."""
    manifest_uri = join(index_uri, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    return validate_manifest(storage.read_json(manifest_uri), manifest_uri)


def load_previous_ids(storage: Storage, index_uri: str, manifest: Optional[dict]):
    """The previous build's id map (id, object_id), checksum-verified, or None without a previous build. One row
    per indexed work: read where the plan is made (the plan task), not on the driver."""
    import pyarrow.parquet as pq

    from artsim.serving.shards import verify_file

    if manifest is None:
        return None
    with tempfile.TemporaryDirectory(prefix="artsim-ids-") as tmp:
        path = os.path.join(tmp, IDS)
        storage.download_file(join(index_uri, manifest["ids"]), path)
        try:
            verify_file(path, manifest["ids_sha256"], manifest["ids_bytes"], join(index_uri, manifest["ids"]))
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}. The previous index's ids cannot be trusted, so ids could not be kept "
                                 f"stable; delete {index_uri} to rebuild with fresh ids") from None
        return pq.read_table(path, columns=["id", "object_id"])


def load_previous(storage: Storage, index_uri: str):
    """The previous build's (manifest, ids table), verified, or (None, None) when there is none."""
    manifest = load_previous_manifest(storage, index_uri)
    return manifest, load_previous_ids(storage, index_uri, manifest)


def build_manifest(plan: BuildPlan, result: BuildResult, model: dict, facets, metadata, seconds: dict,
                   files: int, ids_file: tuple[str, int]) -> dict:
    """manifest.json of a build (docs/DESIGN.md: dim, metric, factory, ntotal, model, search params, shards, ids)."""
    tuning = result.tuning
    return {
        "format": FORMAT, "name": plan.name, "build_id": plan.build_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dim": int(plan.dim), "metric": METRIC, "factory": plan.index.factory, "kind": plan.index.kind,
        "nlist": plan.index.nlist, "ntotal": int(plan.n), "next_id": int(plan.next_id), "model": model,
        "embeddings": plan.emb_uri,
        "search_params": tuning["params"],
        "shards": result.shard_entries,
        "ids": IDS, "ids_sha256": ids_file[0], "ids_bytes": int(ids_file[1]),
        "facets": list(facets), "metadata": list(metadata),
        "recall_at_10": tuning["recall_at_10"], "latency_ms": tuning["latency"],
        "batch_ms_per_query": tuning["batch_ms_per_query"],
        "tuning": tuning,
        "build": {**{k: round(v, 2) for k, v in seconds.items()}, "files": files,
                  "train_vectors": plan.n_train, "gpu": result.use_gpu, "reason": plan.index.reason,
                  "reused_ids": int(plan.reused_ids), "new_ids": int(plan.n - plan.reused_ids),
                  "skipped": plan.skipped},
    }


def write_ids(storage: Storage, index_uri: str, ids_parquet: bytes) -> tuple[str, int]:
    """Write ids.parquet (bytes from ``parquet_bytes(plan.ids_table)``); returns its (sha256, size) for the
    manifest. Runs in a Ray task (``write_ids_task``): the bytes never pass through the driver."""
    storage.write_bytes(join(index_uri, IDS), ids_parquet)
    return hashlib.sha256(ids_parquet).hexdigest(), len(ids_parquet)


def write_manifest(storage: Storage, plan: BuildPlan, result: BuildResult, model: dict, facets, metadata,
                   seconds: dict, files: int, previous_manifest: Optional[dict], ids_file: tuple[str, int]) -> dict:
    """Write manifest.json (the commit; ``ids_file``: the (sha256, size) of the ids.parquet just written by
    ``write_ids``), then delete builds older than the previous one."""
    manifest = build_manifest(plan, result, model, facets, metadata, seconds, files, ids_file)
    storage.write_json(join(plan.index_uri, MANIFEST), manifest)  # last: readers see the new index only from here
    delete_old_builds(storage, plan.index_uri, keep={plan.build_id, build_of(previous_manifest)})
    return manifest


def parquet_bytes(tbl) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd")
    return buf.getvalue()


def build_of(manifest: Optional[dict]) -> Optional[str]:
    if not manifest:
        return None
    path = manifest["shards"][0]["path"]
    parts = path.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "shards" else None


def delete_old_builds(storage: Storage, index_uri: str, keep: set) -> None:
    for build in storage.list(join(index_uri, "shards")):
        if build not in keep:
            storage.delete(join(index_uri, "shards", build))
