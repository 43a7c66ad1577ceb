"""Driver peak memory per stage at N and 10 N records: does the driver hold the collection?

    .venv/bin/python benchmarks/scale_driver.py --n 200000 --stages ingest,download_plan --cpus 2

For each stage and size, a fresh child process (so that VmHWM is the stage's driver alone, see procstat.py) starts a
local Ray with ``--cpus`` CPUs, runs the stage on prepared inputs under benchmarks/out/scale-driver/ (ignored by
git), and reports VmRSS before the stage, VmHWM after it, and the wall time. The parent prints one JSON line per run
and a table with the ratio peak(10 N) / peak(N); the target is <= 1.3 for every stage.

Stages measured here:
- ``ingest``: one table source, a CSV of N rows (~330 bytes a row, 3% duplicate ids), as run_ingest reads it
  (pieces of 64 MB: the 10 N file is cut into byte ranges);
- ``download_plan``: the download stage's planning on that records/ (records/ -> shard tasks, nothing fetched):
  ``artsim.download.shards.plan_shards`` as the stage calls it.
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


def child(stage: str, n: int, cpus: int) -> dict:
    import pyarrow.dataset  # noqa: F401  (libraries loaded before "before": mapped code, not data)
    import pyarrow.parquet  # noqa: F401
    import ray

    from artsim.config import config_from_dict
    from artsim.runtime import RunContext

    root = os.path.join(OUT, f"run-{n}")
    config = config_from_dict({"run": {"root": root}, "sources": [
        {"kind": "table", "path": prepare_csv(n), "collection": "bench"}]})
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    ctx = RunContext(config)
    before = status_mib("VmRSS")
    start = time.perf_counter()
    if stage == "ingest":
        from artsim.ingest.stage import run_ingest

        summary = run_ingest(ctx)
        result = {"records": summary["records"], "pieces": summary["pieces"]}
    elif stage == "download_plan":
        from artsim.download.shards import plan_shards, read_committed
        from artsim.rundir.schema import RETRYABLE_STATUSES

        records = ctx.storage.read_table(ctx.paths.records,
                                         columns=["object_id", "image_url", "iiif_service", "license"])
        plan = plan_shards(records, read_committed(ctx.storage, ctx.paths.images), 1000, False,
                           RETRYABLE_STATUSES)
        result = {"records": plan.total_records, "shards": len(plan.tasks)}
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
