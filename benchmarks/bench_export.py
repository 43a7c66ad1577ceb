"""Throughput and driver memory of `artsim export` on a synthetic run directory.

    .venv/bin/python benchmarks/bench_export.py --n 20000 --formats webdataset,img2dataset

Prepares (once per N) under benchmarks/out/export/ (ignored by git) a run directory with N records and an images/
dataset of N ok rows (384 px JPEG q90 of a few distinct pictures, ~30-40 KB each, in shards of 1,000 like the
download writes), then runs ``run_export`` for each format in a fresh child process and prints one JSON line per
run: wall seconds, images/s, MB/s written, the child's peak RSS (VmHWM) and the output size.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "export"


def prepare(n: int) -> Path:
    import pyarrow as pa
    from PIL import Image, ImageFilter

    from artsim.download.shards import OUTPUT_SCHEMA
    from artsim.rundir.schema import empty_record, records_table
    from artsim.storage import SUCCESS, Storage, join

    root = OUT / f"run-{n}"
    if (root / "images" / SUCCESS).exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    storage = Storage()
    pictures = []
    for i in range(8):
        img = Image.effect_noise((384, 288), 40 + 5 * i).convert("RGB").filter(ImageFilter.GaussianBlur(1))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        pictures.append(buf.getvalue())
    records = []
    for i in range(n):
        r = empty_record()
        r.update(object_id=f"bench:{i}", collection="bench", local_id=str(i), image_url=f"http://m.test/{i}.jpg",
                 title=f"Work {i}", creator=f"Artist {i % 97}", subjects=["a", "b"], license="CC0")
        records.append(r)
    storage.write_table(records_table(records), str(root / "records"))
    images = str(root / "images")
    for start in range(0, n, 1000):
        rows = [{"object_id": f"bench:{i}", "status": "ok", "http_status": 200, "error": None,
                 "url_final": f"http://m.test/{i}.jpg", "width": 384, "height": 288, "sha256": f"{i:064x}",
                 "image": pictures[i % len(pictures)], "host": "m.test", "bytes_downloaded": 900_000,
                 "original_width": 1500, "original_height": 1125, "attempts": 1} for i in range(start, min(n, start + 1000))]
        storage.write_parquet_file(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA),
                                   join(images, f"shard-{start:08d}.parquet"))
    storage.write_bytes(join(images, SUCCESS), b"")
    return root


CHILD = r"""
import json, sys, time
from artsim.config import config_from_dict
from artsim.export import run_export
from artsim.runtime import RunContext
root, fmt, out = sys.argv[1:4]
ctx = RunContext(config_from_dict({"run": {"root": root}}))
t = time.perf_counter()
summary = run_export(ctx, fmt, out)
elapsed = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT " + json.dumps({"samples": summary.samples, "seconds": elapsed, "peak_rss_mib": int(hwm) / 1024}))
"""


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--formats", default="webdataset,img2dataset")
    args = p.parse_args()
    root = prepare(args.n)
    for fmt in args.formats.split(","):
        out = OUT / f"out-{fmt}-{args.n}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", CHILD, str(root), fmt, str(out)], capture_output=True,
                              text=True, env=env, check=True)
        result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
        size = sum(f.stat().st_size for f in out.iterdir())
        result.update(format=fmt, n=args.n, images_per_s=result["samples"] / result["seconds"],
                      mb_written_per_s=size / result["seconds"] / 1e6, output_mb=size / 1e6,
                      load_avg=os.getloadavg()[0])
        print(json.dumps(result))
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
