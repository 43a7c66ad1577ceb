"""Text-query latency of a CLIP model's text tower (what `artsim query --text` / POST {"text": ...} add to a search).

    .venv/bin/python benchmarks/bench_text_query.py                              # open_clip:ViT-B-32, random init
    .venv/bin/python benchmarks/bench_text_query.py --weights laion2b_s34b_b79k  # the published weights (cached)

Prints the model build time (library import + weights), the median single-query latency and a batch's time. Random
and published weights cost the same compute; only the build differs (reading the cached file).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERIES = ["a bronze sculpture of an emperor", "a silver cream jug", "portrait of a woman in a red dress",
           "landscape with cows", "a ship at sea"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="open_clip:ViT-B-32")
    p.add_argument("--weights", default=None)
    p.add_argument("--repeats", type=int, default=4, help="times each of the 5 queries is sent alone")
    args = p.parse_args()
    start = time.perf_counter()
    from artsim.config import EmbedConfig
    from artsim.models.embedder import build_embedder

    embedder = build_embedder(EmbedConfig(model=args.model, weights=args.weights))
    built = time.perf_counter() - start
    queries = QUERIES * args.repeats
    embedder.embed_texts(["warm up"])
    single = []
    for q in queries:
        t = time.perf_counter()
        embedder.embed_texts([q])
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    embedder.embed_texts(queries)
    batch = time.perf_counter() - t
    print(f"bench_text_query: {args.model} ({args.weights or 'random init'}), {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}: build {built:.1f} s; one text query median {statistics.median(single) * 1000:.0f} "
          f"ms (min {min(single) * 1000:.0f}, max {max(single) * 1000:.0f}, n={len(single)}); a batch of "
          f"{len(queries)}: {batch * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
