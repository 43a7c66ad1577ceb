"""Driver memory and wall time of the index stage on embeddings split over several Parquet files.

    .venv/bin/python benchmarks/bench_index_memory.py --n 300000 --dim 256 --files 6 --shards 2

1. prepare (once per shape): N clustered unit vectors stored as float16 in ``--files`` Parquet files with row groups
   of 2048 rows, as the embed stage writes them (embeddings/bench/ + _model.json, no records/), under
   benchmarks/out/index-memory/ (ignored by git);
2. build: a fresh child process starts a local Ray (``--cpus``), runs ``run_index`` and reports
   - driver peak RSS: ``VmHWM`` of /proc/self/status in that process, i.e. the driver alone (Ray's daemons and
     workers are other processes). Not ``getrusage(...).ru_maxrss``: Linux carries that over from the parent
     across fork + exec, so it would report the data-generating parent's peak. Also its RSS (``VmRSS``) just
     before ``run_index`` (Ray started, modules imported), so the difference is what the index stage added;
   - wall time of ``run_index``.
Results are printed as one JSON line per build.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from procstat import status_mib  # noqa: E402  (benchmarks/, next to this script)
OUT = os.path.join(REPO, "benchmarks", "out", "index-memory")


def prepare(n: int, dim: int, files: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from artsim.testing.index_data import clustered_vectors, object_ids_for
    from artsim.rundir.paths import RunPaths
    from artsim.storage import Storage, join

    root = os.path.join(OUT, f"n{n}-d{dim}-f{files}")
    storage, paths = Storage(), RunPaths(root)
    if storage.is_complete(paths.embeddings("bench")):
        return root
    vectors = clustered_vectors(n, dim, n_clusters=max(10, n // 1000), seed=1).astype(np.float16)
    object_ids = object_ids_for(n)
    per_file = -(-n // files)
    with storage.atomic_dir(paths.embeddings("bench")) as staging:
        for i in range(files):
            lo, hi = i * per_file, min(n, (i + 1) * per_file)
            values = pa.array(vectors[lo:hi].reshape(-1))
            table = pa.table({"object_id": pa.array(object_ids[lo:hi], pa.string()),
                              "embedding": pa.FixedSizeListArray.from_arrays(values, dim)})
            pq.write_table(table, join(staging, f"part-{i:05d}.parquet"), row_group_size=2048, compression="zstd")
        storage.write_json(join(staging, "_model.json"), {"name": "bench", "model_key": "bench",
                                                           "output_dim": dim, "dtype": "float16"})
    return root


def build(root: str, shards: int, cpus: int) -> dict:
    import pyarrow.compute  # noqa: F401  (imported up front, like faiss, so that "before" includes the libraries
    import pyarrow.dataset  # noqa: F401   the stage would import lazily: ~100 MiB of mapped code, not data)
    import pyarrow.parquet  # noqa: F401
    import ray

    import artsim.index.ray_tasks  # noqa: F401
    from artsim.config import config_from_dict
    from artsim.index.stage import run_index
    from artsim.runtime import RunContext

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    ctx = RunContext(config_from_dict({"run": {"root": root}, "index": {"embeddings": "bench", "name": "bench",
                                                                         "num_shards": shards}}))
    before = status_mib("VmRSS")
    start = time.perf_counter()
    summary = run_index(ctx)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    manifest = json.loads(ctx.storage.read_text(os.path.join(summary["index_uri"], "manifest.json")))
    ray.shutdown()
    steps = {k: manifest["build"].get(k) for k in ("scan_seconds", "train_seconds", "add_seconds", "tune_seconds")}
    return {**steps, "vectors": summary["vectors"], "dim": summary["dim"], "factory": summary["factory"],
            "shards": shards, "recall_at_10": summary["recall_at_10"], "run_index_s": round(seconds, 1),
            "driver_rss_before_mib": round(before, 1), "driver_peak_rss_mib": round(peak, 1),
            "driver_added_mib": round(peak - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(build(args.child, args.shards, args.cpus)), flush=True)
        return
    root = prepare(args.n, args.dim, args.files)
    data_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "embeddings"))
                     for f in fs)
    print(f"embeddings: {args.n} x {args.dim} float16 in {args.files} files, {data_bytes / 2**20:.1f} MiB on disk; "
          f"float32 in memory would be {args.n * args.dim * 4 / 2**20:.1f} MiB", flush=True)
    for _ in range(args.repeat):
        proc = subprocess.run([sys.executable, __file__, "--child", root, "--shards", str(args.shards),
                               "--cpus", str(args.cpus)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"build failed (exit {proc.returncode})")
        print(lines[-1][len("RESULT "):], flush=True)


if __name__ == "__main__":
    main()
