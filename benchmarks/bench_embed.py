"""Embed throughput: the Ray Data pipeline (run_embed) vs a plain single-process PyTorch loop.

Same model, batch size, images, preprocessing code and torch threads on both sides. Prints images/s for each and
the ratio (target >= 0.9 on CPU), end to end (model construction and Ray actor start included) and steady state.

    .venv/bin/python benchmarks/bench_embed.py --model resnet50 --images 400            # CPU, this machine
    .venv/bin/python benchmarks/bench_embed.py --model resnet50 --images 20000 --num-gpus 1 --num-actors 1 \\
        --batch-size 128 --precision bf16                                                  # a GPU box

Images are the 80 real Met thumbnails in data/met_sample/images (320 px, like the download stage's output),
repeated under distinct object ids to reach --images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from artsim.config import config_from_dict  # noqa: E402
from artsim.runtime import RunContext  # noqa: E402
from artsim.rundir.schema import IMAGES_SCHEMA  # noqa: E402


def build_images(ctx: RunContext, n: int) -> list[dict]:
    files = sorted((REPO / "data" / "met_sample" / "images").glob("*.jpg"))
    rows = []
    for i in range(n):
        path = files[i % len(files)]
        rows.append({"object_id": f"bench:{i}", "status": "ok", "http_status": 200, "error": None,
                     "url_final": None, "width": None, "height": None, "sha256": None, "image": path.read_bytes()})
    ctx.storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), ctx.paths.images, rows_per_file=200)
    return rows


def plain_loop(ctx: RunContext, rows: list[dict], threads: int) -> dict:
    """The baseline: decode + preprocess + model, batch by batch, in this process."""
    import torch

    from artsim.models.embedder import build_embedder
    from artsim.models.preprocess import pixels_batch

    cfg = ctx.config.embed
    torch.set_num_threads(threads)
    start = time.perf_counter()
    embedder = build_embedder(cfg, ctx.storage)
    if cfg.num_gpus > 0:
        embedder = embedder.to("cuda", memory_format=torch.channels_last)
    built = time.perf_counter()
    precision = cfg.precision if cfg.num_gpus > 0 else "fp32"
    vectors = {}
    first_batch_at = None
    for i in range(0, len(rows), cfg.batch_size):
        batch = rows[i:i + cfg.batch_size]
        pixels, _ = pixels_batch([r["image"] for r in batch], embedder.spec.resize_size, embedder.spec.image_size)
        out = embedder.embed_pixels(pixels, precision)
        vectors.update({r["object_id"]: v for r, v in zip(batch, out)})
        first_batch_at = first_batch_at or time.perf_counter()
    end = time.perf_counter()
    n = len(rows)
    # steady state as the pipeline measures it: images after the first batch / time after the first batch
    after_first = n - min(cfg.batch_size, n)
    return {"images": n, "seconds": end - start, "images_per_s": n / (end - start),
            "steady_images_per_s": after_first / (end - first_batch_at) if after_first else 0.0,
            "first_batch_s": first_batch_at - start, "model_build_s": built - start, "vectors": vectors}


def ray_pipeline(ctx: RunContext) -> dict:
    from artsim.embed.stage import run_embed

    start = time.perf_counter()
    summary = run_embed(ctx)
    seconds = time.perf_counter() - start
    table = ctx.storage.read_table(summary["output"])
    vectors = dict(zip(table.column("object_id").to_pylist(),
                       np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)))
    return {"images": summary["embedded"], "seconds": seconds, "images_per_s": summary["embedded"] / seconds,
            "steady_images_per_s": summary["steady_images_per_s"], "first_batch_s": summary["first_batch_s"],
            "bottleneck": summary["bottleneck"],
            "vectors": vectors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--torch-threads", type=int, default=None, help="default: cores / actors")
    p.add_argument("--repeats", type=int, default=1, help="alternate plain and Ray runs this many times")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import ray

    cores = len(os.sched_getaffinity(0))
    threads = args.torch_threads or max(1, cores // args.num_actors)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        ctx = RunContext(config_from_dict({
            "run": {"root": tmp},
            "embed": {"model": args.model, "weights": None, "batch_size": args.batch_size,
                      "image_size": args.image_size, "num_actors": args.num_actors, "num_gpus": args.num_gpus,
                      "precision": args.precision, "torch_threads": threads}}))
        rows = build_images(ctx, args.images)
        print(f"bench_embed: {args.model} random init, {args.image_size} px, {args.images} images, batch "
              f"{args.batch_size}, {threads} torch threads, {cores} cores, load average {os.getloadavg()[0]:.2f}")
        # address="local": a fresh Ray of our own, even when another Ray runs on this machine
        ray.init(address="local", num_cpus=args.num_cpus or cores, include_dashboard=False, log_to_driver=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Alternate the two so that load from other jobs on a shared machine hits both alike; report medians.
        plains, pipes = [], []
        for rep in range(args.repeats):
            plain = plain_loop(ctx, rows, threads if args.num_gpus == 0 else cores)
            plains.append(plain)
            print(f"[{rep + 1}/{args.repeats}] plain loop : {plain['images_per_s']:.2f} images/s end to end "
                  f"({plain['seconds']:.1f}s; first batch after {plain['first_batch_s']:.1f}s, then "
                  f"{plain['steady_images_per_s']:.2f}/s)", flush=True)
            piped = ray_pipeline(ctx)
            pipes.append(piped)
            print(f"[{rep + 1}/{args.repeats}] ray        : {piped['images_per_s']:.2f} images/s end to end "
                  f"({piped['seconds']:.1f}s; first batch after {piped['first_batch_s']:.1f}s, then "
                  f"{piped['steady_images_per_s']:.2f}/s); {piped['bottleneck']}", flush=True)
        ray.shutdown()
        diff = max(float(np.abs(pipes[-1]["vectors"][k] - v).max()) for k, v in plains[-1]["vectors"].items())

        def median(runs, key):
            return float(np.median([r[key] for r in runs]))

        ratio = median(pipes, "images_per_s") / median(plains, "images_per_s")
        steady_ratio = median(pipes, "steady_images_per_s") / median(plains, "steady_images_per_s")
        print(f"ratio ray/plain (medians of {args.repeats}): {ratio:.3f} end to end, {steady_ratio:.3f} steady state "
              f"(target >= 0.9); max |difference| between the two sets of vectors {diff:.2e}; "
              f"load average now {os.getloadavg()[0]:.2f}")
        result = {"model": args.model, "images": args.images, "batch_size": args.batch_size,
                  "image_size": args.image_size, "threads": threads, "cores": cores, "repeats": args.repeats,
                  "plain": [{k: v for k, v in r.items() if k != "vectors"} for r in plains],
                  "ray": [{k: v for k, v in r.items() if k != "vectors"} for r in pipes],
                  "ratio": ratio, "steady_ratio": steady_ratio, "max_abs_diff": diff}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
