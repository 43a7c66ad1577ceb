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
  model (mobilenet_v3_small, random init, 32 px crops, batch 256, one actor): everything embedded, from scratch.
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


EMBED = {"model": "mobilenet_v3_small", "weights": None, "image_size": 32, "batch_size": 256,
         "rows_per_file": 4096, "num_actors": 1}


def child(stage: str, n: int, cpus: int) -> dict:
    import pyarrow.dataset  # noqa: F401  (libraries loaded before "before": mapped code, not data)
    import pyarrow.parquet  # noqa: F401
    import ray

    from artsim.config import config_from_dict
    from artsim.runtime import RunContext

    root = os.path.join(OUT, f"run-{n}" if stage != "embed" else f"embed-{n}")
    table = prepare_csv(n) if stage == "ingest" else os.path.join(OUT, f"table-{n}.csv")
    config = config_from_dict({"run": {"root": root}, "embed": EMBED, "sources": [
        {"kind": "table", "path": table, "collection": "bench"}]})
    if stage == "embed":
        import shutil

        prepare_images(root, n)
        shutil.rmtree(os.path.join(root, "embeddings"), ignore_errors=True)  # embed all of it, not a resume
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    ctx = RunContext(config)
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
