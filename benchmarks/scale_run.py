"""The whole pipeline on a synthetic collection of N works on this machine: where the time goes as N grows.

    .venv/bin/python benchmarks/scale_run.py --n 20000 [--model resnet18] [--image-size 256] [--root DIR]

Writes a synthetic collection (artsim.testing.synthetic: images whose palette, motif and format follow hidden creator,
subject and object-type factors; several collections) once, serves it from a loopback HTTP server so the real
download path runs (politeness and safety on; one host, so `download.per_host_connections` caps the fetch rate),
then runs ingest -> download -> embed (random-init backbone: nothing is downloaded) -> mine -> train (head, Ray
Train) -> index -> links -> report on a local Ray, and prints per stage: seconds, works per second, and the
driver's peak resident memory (VmHWM of this process, which starts fresh: the collection is rendered in a child).
No timing assertions: numbers move with the machine and its load (printed with the load average).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from procstat import status_mib  # noqa: E402  (benchmarks/, next to this script)


def ensure_collection(out: Path, n: int, image_size: int, collections: int) -> Path:
    csv_path = out / "records.csv"
    if csv_path.exists():  # written last by artsim.testing.synthetic: its presence means every image is there
        return csv_path
    subprocess.run([sys.executable, "-m", "artsim.testing.synthetic", str(out), "--n", str(n), "--image-size",
                    str(image_size), "--n-collections", str(collections)], check=True, cwd=REPO)
    return csv_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=256, help="side of the rendered originals")
    p.add_argument("--crop", type=int, default=128, help="crop side fed to the backbone")
    p.add_argument("--collections", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--root", default=str(REPO / "benchmarks" / "out" / "scale"))
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    from artsim.config import config_from_dict
    from artsim.console import say, table
    from artsim.demo import serve_directory
    from artsim.pipeline import run_pipeline
    from artsim.runtime import RunContext

    root = Path(args.root)
    collection_dir = root / f"collection-{args.n}-{args.image_size}"
    t0 = time.perf_counter()
    csv_path = ensure_collection(collection_dir, args.n, args.image_size, args.collections)
    say(f"collection: {csv_path} ({time.perf_counter() - t0:.1f} s to make or find)")
    run_root = root / f"run-{args.n}-{args.model}"
    if run_root.exists():
        import shutil

        shutil.rmtree(run_root)
    load_before = os.getloadavg()
    with serve_directory(collection_dir) as base_url:
        cfg = config_from_dict({
            "run": {"root": str(run_root)},
            "ray": {"address": "local", "num_cpus": args.num_cpus},  # a private Ray, as before ray.address null joined clusters
            "sources": [{"kind": "table", "path": str(csv_path), "collection": "synth", "license": "CC0",
                         "image_url_template": f"{base_url}/images/{{local_id}}.jpg"}],
            "download": {"image_size": args.image_size, "allow_hosts": ["127.0.0.1"], "per_host_connections": 16,
                         "per_host_requests_per_second": 10000.0},
            "embed": {"model": args.model, "weights": None, "image_size": args.crop, "batch_size": 64},
            "mine": {"num_triplets": 10000, "strategies": {"shared_terms": 1.0, "text": 1.0}},
            "train": {"name": "scale", "mode": "head", "epochs": 3, "num_workers": 2, "head_dim": 128},
            "index": {"embeddings": f"{args.model}-scale"},
            "links": {"k": 5},
            "pipeline": {"stages": ["ingest", "download", "embed", "mine", "train", "index", "links", "report"]},
        })
        started = time.perf_counter()
        result = run_pipeline(RunContext(cfg))
        total = time.perf_counter() - started
    load_after = os.getloadavg()

    seconds = {name: round(s, 1) for name, s in result["seconds"].items()}  # run_pipeline's per-stage wall times
    rows = [[name, f"{s:.1f}", f"{args.n / max(s, 1e-9):.0f}"] for name, s in seconds.items()]
    peak_mib = status_mib("VmHWM")
    say(f"scale run: {args.n} works, {args.model} at {args.crop} px, {args.num_cpus} CPUs; {total:.0f} s in all; "
        f"driver peak RSS {peak_mib:.0f} MiB; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    table(["stage", "seconds", "works/s"], rows)
    out = {"n": args.n, "model": args.model, "crop": args.crop, "num_cpus": args.num_cpus, "total_s": round(total, 1),
           "stage_seconds": seconds, "driver_peak_rss_mib": round(peak_mib), "load": [load_before, load_after]}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
