"""Driver memory and wall time of the report stage on a large synthetic run directory.

    .venv/bin/python benchmarks/bench_report_memory.py --n 500000 --dim 256 --files 6 --versions new,old

1. prepare (once per shape): under benchmarks/out/report-memory/ (ignored by git) a run directory with N works in
   4 collections of uneven size: records/ (title, collection, subjects; several files), embeddings/bench/ (N unit
   vectors as float16 in ``--files`` Parquet files, row groups of 2048 rows, as the embed stage writes them) and
   links/bench/ (3 cross-collection links per work). No images (thumbnails are missing, as in a run whose images
   live elsewhere).
2. report: a fresh child process runs ``run_report`` and reports
   - driver peak RSS: ``VmHWM`` of /proc/self/status in that process. Not ``getrusage(...).ru_maxrss``: Linux
     carries that over from the parent across fork + exec. Also ``VmRSS`` just before ``run_report`` (modules
     imported), so the difference is what the report stage added;
   - wall time of ``run_report``.
   ``--versions old`` runs the report module as it was before sampling (``git show <rev>:artsim/report.py``,
   default rev b5996b0) against the same run directory; ``--no-curate`` turns off suggested tags and vocabulary
   (the old version runs exact k-NN over every vector for tags and text-encodes every record for the vocabulary:
   hours at this size on a 2-core machine, so the old version is only measured without them).
Results are printed as one JSON line per run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from procstat import status_mib  # noqa: E402  (benchmarks/, next to this script)
OUT = os.path.join(REPO, "benchmarks", "out", "report-memory")
SHARES = {"met": 0.6, "smk": 0.25, "rijks": 0.14, "tiny": 0.01}


def prepare(n: int, dim: int, files: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from artsim.rundir.schema import RECORDS_SCHEMA
    from artsim.rundir.paths import RunPaths
    from artsim.storage import Storage, join

    root = os.path.join(OUT, f"n{n}-d{dim}-f{files}")
    storage, paths = Storage(), RunPaths(root)
    if storage.is_complete(paths.links("bench")):
        return root
    rng = np.random.default_rng(0)
    names = np.array(list(SHARES))
    collection = names[rng.choice(len(names), n, p=list(SHARES.values()))]
    object_ids = np.char.add(np.char.add(collection.astype(str), ":"), np.arange(n).astype(str))
    subjects_pool = np.array(["Horses", "Landscapes", "Portraits", "Ships", "Flowers", "Saints"])
    per_file = -(-n // files)

    with storage.atomic_dir(paths.records) as staging:
        for i in range(files):
            lo, hi = i * per_file, min(n, (i + 1) * per_file)
            m = hi - lo
            subj = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * m + 1, 2, dtype=np.int32)),
                                            pa.array(subjects_pool[rng.integers(0, len(subjects_pool), 2 * m)]))
            cols = {"object_id": pa.array(object_ids[lo:hi]), "collection": pa.array(collection[lo:hi]),
                    "title": pa.array(np.char.add("Work ", np.arange(lo, hi).astype(str))), "subjects": subj}
            table = pa.table([cols[f.name] if f.name in cols else pa.nulls(m, f.type) for f in RECORDS_SCHEMA],
                             schema=RECORDS_SCHEMA)
            pq.write_table(table, join(staging, f"part-{i:05d}.parquet"), compression="zstd")

    with storage.atomic_dir(paths.embeddings("bench")) as staging:
        for i in range(files):
            lo, hi = i * per_file, min(n, (i + 1) * per_file)
            vectors = rng.normal(size=(hi - lo, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            table = pa.table({"object_id": pa.array(object_ids[lo:hi]),
                              "embedding": pa.FixedSizeListArray.from_arrays(
                                  pa.array(vectors.astype(np.float16).reshape(-1)), dim)})
            pq.write_table(table, join(staging, f"part-{i:05d}.parquet"), row_group_size=2048, compression="zstd")
        storage.write_json(join(staging, "_model.json"), {"name": "bench", "model_key": "bench",
                                                           "output_dim": dim, "dtype": "float16"})

    with storage.atomic_dir(paths.links("bench")) as staging:
        for i in range(files):
            lo, hi = i * per_file, min(n, (i + 1) * per_file)
            src = np.repeat(np.arange(lo, hi), 3)
            dst = rng.integers(0, n, len(src))  # cross-collection in spirit; the report does not check
            rank = np.tile(np.arange(1, 4, dtype=np.int32), hi - lo)
            score = (rng.random(hi - lo) * 0.5 + 0.45).repeat(3) - 0.01 * rank
            table = pa.table({"object_id": pa.array(object_ids[src]), "neighbor_id": pa.array(object_ids[dst]),
                              "rank": rank, "score": score.astype(np.float32),
                              "neighbor_collection": pa.array(collection[dst])})
            pq.write_table(table, join(staging, f"part-{i:05d}.parquet"), compression="zstd")
    return root


def report(root: str, version: str, rev: str, curate: bool, max_works: int, audit: bool = True) -> dict:
    import faiss  # noqa: F401  (imported up front, so that "before" includes the libraries the stage would
    import matplotlib.pyplot  # noqa: F401   import lazily: mapped code, not data)
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from artsim.config import config_from_dict
    from artsim.runtime import RunContext

    if version == "old":
        source = subprocess.run(["git", "show", f"{rev}:artsim/report.py"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout
        path = os.path.join(tempfile.mkdtemp(), "report_old.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("report_old", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        run_report = module.run_report
    else:
        from artsim.report.stage import run_report
    report_cfg = {"name": f"bench-{version}", "suggest_tags": curate, "classify_vocabulary": curate}
    if version == "new":
        report_cfg["max_works"] = max_works
        report_cfg["audit"] = audit
    ctx = RunContext(config_from_dict({"run": {"root": root}, "index": {"embeddings": "bench"},
                                       "report": report_cfg}))
    before = status_mib("VmRSS")
    start = time.perf_counter()
    summary = run_report(ctx)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    return {"version": version, "curate": curate, "audit": audit if version == "new" else None,
            "max_works": max_works if version == "new" else None,
            "sampled_works": summary.get("sampled_works"), "page_mb": round(summary["bytes"] / 1e6, 2),
            "run_report_s": round(seconds, 1), "driver_rss_before_mib": round(before, 1),
            "driver_peak_rss_mib": round(peak, 1), "driver_added_mib": round(peak - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--max-works", type=int, default=20_000)
    ap.add_argument("--versions", default="new,old")
    ap.add_argument("--rev", default="b5996b0", help="git revision of the old report module")
    ap.add_argument("--no-curate", action="store_true")
    ap.add_argument("--no-audit", action="store_true", help="new version: without the data-quality audit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--version", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = report(args.child, args.version, args.rev, not args.no_curate, args.max_works, not args.no_audit)
        print("RESULT " + json.dumps(result), flush=True)
        return
    start = time.perf_counter()
    root = prepare(args.n, args.dim, args.files)
    print(f"run directory {root}: {args.n} works x {args.dim} float16 in {args.files} files "
          f"(prepared in {time.perf_counter() - start:.0f} s); float32 in memory would be "
          f"{args.n * args.dim * 4 / 2**20:.1f} MiB", flush=True)
    for version in args.versions.split(","):
        cmd = [sys.executable, __file__, "--child", root, "--version", version, "--rev", args.rev,
               "--max-works", str(args.max_works)] + (["--no-curate"] if args.no_curate else []) + (
                   ["--no-audit"] if args.no_audit else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"report ({version}) failed (exit {proc.returncode})")
        print(lines[-1][len("RESULT "):], flush=True)


if __name__ == "__main__":
    main()
