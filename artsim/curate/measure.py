"""Measure the curator outputs on a local run directory (default artifacts/demo: 80 real Met works).

``python -m artsim.curate.measure [RUN_DIR] [--model resnet50]`` prints tag-recommendation recall@5 (vs popularity
and vs random vectors), vocabulary classification against Met classifications, and one latent walk. Numbers are in
docs/curate.md; with random-init embedding weights expect weak image-based numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from artsim.curate import classify_vocabulary, evaluate_tag_recommendation, evaluate_vocabulary, latent_walk
from artsim.errors import ArtsimError

# Met object types in the demo records -> Europeana category (ambiguous ones such as "Metal" are left out)
MET_TYPE_TO_EUROPEANA = {"Painting": "painting", "Paintings": "painting", "Handscroll": "painting",
                         "Album": "painting", "Painting, birth tray": "painting", "Sculpture": "sculpture",
                         "Ceramics": "ceramics", "Clay": "ceramics", "Photographs": "photograph"}


def measure_run(run_dir: Path, model: str = "resnet50", k: int = 5) -> dict:
    records_dir, emb_dir = run_dir / "records", run_dir / "embeddings" / model
    for d in (records_dir, emb_dir):
        if not (d / "_SUCCESS").exists():
            raise ArtsimError(f"measure: {d} is missing or incomplete (run the pipeline first)")
    records = pq.read_table(records_dir)
    emb = pq.read_table(emb_dir, columns=["object_id", "embedding"])
    vectors = np.stack(emb.column("embedding").to_pylist()).astype(np.float32)
    ids = emb.column("object_id").to_pylist()
    control = np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
    out: dict = {"works": len(ids), "tags": {}, "vocabulary": {}}
    for kind in (None, "subject", "concept"):
        name = kind or "any"
        out["tags"][name] = evaluate_tag_recommendation(records, vectors, ids, k=k, kind=kind)
        out["tags"][name + "_random_vectors"] = evaluate_tag_recommendation(records, control, ids, k=k, kind=kind)
    labels = {r["object_id"]: MET_TYPE_TO_EUROPEANA[r["object_type"]] for r in records.to_pylist()
              if r["object_type"] in MET_TYPE_TO_EUROPEANA}
    if labels:
        from artsim.text import load_sentence_encoder

        encoder = load_sentence_encoder()
        out["vocabulary"]["text_full_record"] = evaluate_vocabulary(
            classify_vocabulary(records, text_encoder=encoder), labels)
        out["vocabulary"]["text_title_medium_culture"] = evaluate_vocabulary(classify_vocabulary(
            records, text_encoder=encoder,
            text_of=lambda r: ". ".join(x for x in (r.get("title"), r.get("medium"), r.get("culture")) if x)), labels)
        known = {o: [c] for i, (o, c) in enumerate(sorted(labels.items())) if i % 2 == 0}
        held = {o: c for o, c in labels.items() if o not in known}
        for name, vecs in (("image_knn_half_labelled", vectors), ("image_knn_random_vectors", control)):
            pred = classify_vocabulary(records, use_text=False, vectors=vecs, vector_ids=ids, known=known, k=k)
            out["vocabulary"][name] = evaluate_vocabulary([p for p in pred if p["object_id"] in held], held)
    out["walk"] = latent_walk(vectors, ids, ids[0], ids[-1], steps=6)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m artsim.curate.measure", description=__doc__)
    p.add_argument("run_dir", nargs="?", default="artifacts/demo")
    p.add_argument("--model", default="resnet50")
    args = p.parse_args(argv)
    try:
        print(json.dumps(measure_run(Path(args.run_dir), args.model), indent=1))
    except ArtsimError as exc:
        print(f"artsim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
