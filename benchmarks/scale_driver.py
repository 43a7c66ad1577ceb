"""Driver peak memory per stage at N and 10 N records: does the driver hold the collection?

    .venv/bin/python benchmarks/scale_driver.py --n 200000 --stages ingest,download_plan --cpus 2

For each stage and size, a fresh child process (so that VmHWM is the stage's driver alone, see procstat.py) starts a
local Ray with ``--cpus`` CPUs, runs the stage on prepared inputs under benchmarks/out/scale-driver/ (ignored by
git), and reports VmRSS before the stage, VmHWM after it, and the wall time. The parent prints one JSON line per run
and a table with the ratio peak(10 N) / peak(N); the target is <= 1.3 for every stage.

Stages measured here:
- ``ingest``: one table source, a CSV of N rows (~330 bytes a row, 3% duplicate ids), as run_ingest reads it
  (pieces of 64 MB: the 10 N file is cut into byte ranges);
- ``download_plan``: the download stage's planning on that records/ (records/ -> shard-task files, nothing
  fetched) and its report's counting of images/: ``artsim.download.planner.plan_download`` with Ray tasks and
  ``count_committed``, as the stage calls them;
- ``embed``: run_embed on an images/ of N ok rows (tiny 24 px JPEGs in shard files of 1000 rows), with the smallest
  model (mobilenet_v3_small, random init, 32 px crops, batch 256, one actor): everything embedded, from scratch;
- ``mine``: run_mine on a records/ of N works (3 collections, 977 creators, 2 subjects of 400 and an object type
  each, titles and descriptions; files of 100,000 rows) and embeddings/bench/ of the same works, strategies
  shared_terms, same_creator and hard_negatives (the text strategy's sentence encoder is left out: its cost follows
  the pool, mine.max_objects, not N), 20,000 triplets, mine.max_objects at its default (200,000);
- ``index``: run_index on that embeddings/bench/ (64-dim float16 unit vectors around 100 centres, files of 50,000
  rows, as embed writes them) joined with that records/ for the default facets and metadata; ``IVF256,SQ8``
  (train_sample 20,000) in 4 shards at both sizes, so the same code path runs at N and 10 N.
The inputs for mine and index are written once per N by the parent with the artsim.rundir / storage writers.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import status_mib  # noqa: E402

OUT = os.path.join(REPO, "benchmarks", "out", "scale-driver")
WORDS = ("landscape", "portrait", "river", "harbour", "saint", "still life", "study", "vase", "horse", "garden")


def prepare_csv(n: int) -> str:
    path = os.path.join(OUT, f"table-{n}.csv")
    if os.path.exists(path):
        return path
    os.makedirs(OUT, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "creator", "date", "image_url", "subjects", "license", "description"])
        for i in range(n):
            oid = i if i % 33 else i // 2  # ~3% repeat an earlier id
            w.writerow([oid, f"{WORDS[i % 10]} {i}", f"Painter {i % 977}", str(1500 + i % 500),
                        f"https://images.example.org/{i % 211}/{oid}.jpg", f"{WORDS[i % 7]}|{WORDS[i % 3]}",
                        "CC0" if i % 4 else "CC-BY-4.0",
                        f"An object described at some length, number {i}, with a few more words to be realistic."])
    os.replace(tmp, path)
    return path


def prepare_images(root: str, n: int, shard_size: int = 1000) -> None:
    """images/ as the download writes it: shard files of ``shard_size`` rows, every row ``ok`` with a tiny JPEG."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from artsim.rundir.schema import IMAGES_SCHEMA

    images = os.path.join(root, "images")
    if os.path.exists(os.path.join(images, "_SUCCESS")):
        return
    os.makedirs(images, exist_ok=True)
    jpegs = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (16 * i, 255 - 16 * i, 7 * i)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    for start in range(0, n, shard_size):
        rows = [{"object_id": f"bench:{i}", "status": "ok", "http_status": 200, "width": 24, "height": 24,
                 "image": jpegs[i % 16]} for i in range(start, min(n, start + shard_size))]
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA),
                       os.path.join(images, f"shard-{start // shard_size:08d}.parquet"))
    open(os.path.join(images, "_SUCCESS"), "w").close()


SUBJECTS = tuple(f"{w} {k}" for k in range(40) for w in WORDS)  # 400 subject terms
CULTURES = ("China", "Japan", "France", "Netherlands", "Italy", "Egypt", "Mexico", "Denmark")
OBJECT_TYPES = ("painting", "print", "drawing", "vase", "textile")
COLLECTIONS = ("met", "smk", "rijks")
DIM = 64
RECORDS_PER_FILE = 100_000
EMBEDDINGS_PER_FILE = 50_000


def prepare_records_and_embeddings(root: str, n: int) -> None:
    """records/ and embeddings/bench/ of n works, written chunk by chunk (the parent's memory stays small)."""
    import numpy as np
    import pyarrow as pa

    from artsim.rundir.paths import RunPaths
    from artsim.rundir.schema import RECORDS_SCHEMA
    from artsim.storage import Storage, join
    from artsim.testing.index_data import clustered_vectors

    storage, paths = Storage(), RunPaths(root)
    if not storage.is_complete(paths.records):
        with storage.atomic_dir(paths.records) as staging:
            for f, start in enumerate(range(0, n, RECORDS_PER_FILE)):
                i = np.arange(start, min(n, start + RECORDS_PER_FILE))
                m = len(i)
                ids = [f"{COLLECTIONS[k % 3]}:{k}" for k in i.tolist()]
                cols = {
                    "object_id": ids, "collection": [COLLECTIONS[k % 3] for k in i.tolist()],
                    "local_id": [str(k) for k in i.tolist()],
                    "image_url": [f"https://images.example.org/{k % 211}/{k}.jpg" for k in i.tolist()],
                    "title": [f"{WORDS[k % 10]} {k}" for k in i.tolist()],
                    "creator": [f"Painter {k % 977}" for k in i.tolist()],
                    "date": [str(1500 + k % 450) for k in i.tolist()],
                    "date_begin": (1500 + i % 450).astype(np.int32), "date_end": (1510 + i % 450).astype(np.int32),
                    "culture": [CULTURES[k % 8] for k in i.tolist()],
                    "object_type": [OBJECT_TYPES[(k // 7) % 5] for k in i.tolist()],
                    "subjects": [[SUBJECTS[(k * 7) % 400], SUBJECTS[(k * 13 + 5) % 400]] for k in i.tolist()],
                    "license": ["CC0" if k % 4 else "CC-BY-4.0" for k in i.tolist()],
                    "description": [f"An object described at some length, number {k}, with a few more words."
                                    for k in i.tolist()],
                    "source": ["table"] * m,
                }
                table = pa.table({fld.name: cols[fld.name] if fld.name in cols else pa.nulls(m, fld.type)
                                  for fld in RECORDS_SCHEMA}, schema=RECORDS_SCHEMA)
                storage.write_parquet_file(table, join(staging, f"part-{f:05d}.parquet"))
    emb = paths.embeddings("bench")
    if not storage.is_complete(emb):
        with storage.atomic_dir(emb) as staging:
            for f, start in enumerate(range(0, n, EMBEDDINGS_PER_FILE)):
                m = min(n, start + EMBEDDINGS_PER_FILE) - start
                vectors = clustered_vectors(m, DIM, seed=f)
                values = pa.array(vectors.astype(np.float16).reshape(-1))
                table = pa.table({"object_id": [f"{COLLECTIONS[k % 3]}:{k}" for k in range(start, start + m)],
                                  "embedding": pa.FixedSizeListArray.from_arrays(values, DIM),
                                  "model": ["bench"] * m})
                storage.write_parquet_file(table, join(staging, f"part-{f:05d}.parquet"))
            storage.write_json(join(staging, "_model.json"), {"name": "bench", "model_key": "bench",
                                                               "output_dim": DIM, "dtype": "float16"})


MINE = {"num_triplets": 20_000, "strategies": {"shared_terms": 1.0, "same_creator": 1.0, "hard_negatives": 1.0},
        "embeddings": "bench"}
INDEX = {"embeddings": "bench", "factory": "IVF256,SQ8", "train_sample": 20_000, "num_shards": 4}


EMBED = {"model": "mobilenet_v3_small", "weights": None, "image_size": 32, "batch_size": 256,
         "rows_per_file": 4096, "num_actors": 1}


def child(stage: str, n: int, cpus: int) -> dict:
    import pyarrow.dataset  # noqa: F401  (libraries loaded before "before": mapped code, not data)
    import pyarrow.parquet  # noqa: F401
    import ray

    from artsim.config import config_from_dict
    from artsim.runtime import RunContext

    root = os.path.join(OUT, {"embed": f"embed-{n}", "mine": f"mine-index-{n}",
                              "index": f"mine-index-{n}"}.get(stage, f"run-{n}"))
    table = prepare_csv(n) if stage == "ingest" else os.path.join(OUT, f"table-{n}.csv")
    if stage == "index":
        import shutil

        shutil.rmtree(os.path.join(root, "index"), ignore_errors=True)  # a first build, not a rebuild
    config = config_from_dict({"run": {"root": root}, "embed": EMBED, "mine": MINE, "index": INDEX, "sources": [
        {"kind": "table", "path": table, "collection": "bench"}]})
    if stage == "embed":
        import shutil

        prepare_images(root, n)
        shutil.rmtree(os.path.join(root, "embeddings"), ignore_errors=True)  # embed all of it, not a resume
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    ctx = RunContext(config)
    if stage == "index":
        import faiss  # noqa: F401  (loaded before "before", like pyarrow above)
    if stage == "embed":
        import torch  # noqa: F401  (libraries loaded before "before", like pyarrow above)
        import torchvision  # noqa: F401
    before = status_mib("VmRSS")
    start = time.perf_counter()
    if stage == "ingest":
        from artsim.ingest.stage import run_ingest

        summary = run_ingest(ctx)
        result = {"records": summary["records"], "pieces": summary["pieces"]}
    elif stage == "download_plan":
        from artsim.download.planner import count_committed, plan_download, ray_plan_runner
        from artsim.rundir.schema import REFETCH_STATUSES
        from artsim.storage import join

        plan = plan_download(ctx.storage, ctx.paths.records, ctx.paths.images,
                             join(ctx.paths.root, "_work", "download-plan"), 1000, REFETCH_STATUSES,
                             remote=ray_plan_runner)
        counted = count_committed(ctx.storage, ctx.paths.images)
        result = {"records": plan.total_records, "shards": plan.shards, "task_files": len(plan.task_files),
                  "committed_rows_counted": counted.rows}
    elif stage == "embed":
        from artsim.embed.stage import run_embed

        summary = run_embed(ctx)
        result = {"records": summary["embedded"], "images_per_s": summary["images_per_s"]}
    elif stage == "mine":
        from artsim.mine.stage import run_mine

        summary = run_mine(ctx)
        result = {"records": summary["pool"]["records"], "pool": summary["pool"]["objects"],
                  "triplets": summary["triplets"], "by_strategy": summary["by_strategy"]}
    elif stage == "index":
        from artsim.index.stage import run_index

        summary = run_index(ctx)
        result = {"records": summary["vectors"], "factory": summary["factory"], "shards": summary["shards"],
                  "recall_at_10": summary["recall_at_10"]}
    else:
        raise SystemExit(f"unknown stage {stage}")
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    ray.shutdown()
    return {"stage": stage, "n": n, **result, "seconds": round(seconds, 1), "rss_before_mib": round(before, 1),
            "peak_mib": round(peak, 1), "added_mib": round(peak - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--stages", default="ingest,download_plan")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--size", type=int, default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.size, args.cpus)), flush=True)
        return
    rows = []
    for stage in args.stages.split(","):
        for n in (args.n, 10 * args.n):
            if stage == "ingest":
                prepare_csv(n)
            if stage in ("mine", "index"):
                prepare_records_and_embeddings(os.path.join(OUT, f"mine-index-{n}"), n)
            env = dict(os.environ, PYTHONPATH=REPO, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", stage, "--size", str(n),
                                   "--cpus", str(args.cpus)], env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{stage} n={n}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                break
            result = json.loads(lines[-1][len("RESULT "):])
            print(json.dumps(result), flush=True)
            rows.append(result)
    print(f"\n| stage | N | driver peak (MiB) | 10 N | driver peak (MiB) | ratio | wall N / 10 N (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    by = {(r["stage"], r["n"]): r for r in rows}
    for stage in args.stages.split(","):
        a, b = by.get((stage, args.n)), by.get((stage, 10 * args.n))
        if a and b:
            print(f"| {stage} | {a['n']:,} | {a['peak_mib']} | {b['n']:,} | {b['peak_mib']} | "
                  f"{b['peak_mib'] / a['peak_mib']:.2f} | {a['seconds']} / {b['seconds']} |")


if __name__ == "__main__":
    main()
