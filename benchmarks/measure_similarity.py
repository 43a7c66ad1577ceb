"""Measure what triplet training does on the real Met sample (data/met_sample: 80 images, 2 record formats).

Runs the real pipeline on a local Ray: ingest -> download (from a loopback server) -> embed (random-init backbone,
no weights are ever downloaded) -> mine -> train (head mode, then finetune mode) -> embed again with each export.
Then reports recall@10 of same-creator works and of works sharing a subject tag (Met API tags / 2013 what_terms),
before and after training, and the time per epoch. Everything is seeded; numbers move only with CPU timing.

    .venv/bin/python benchmarks/measure_similarity.py [--model resnet18] [--epochs 5] [--root DIR] [--json OUT]

Read the numbers with care: 80 works, few creators with two or more works, and the training triplets come from
the same subject tags the "shared subject" recall is computed with, over the same works (transductive). They show
that the machinery learns what it is given; they are no estimate of quality on a real collection. The held-out
validation recall (objects never seen in training) is printed too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "artifacts" / "measure_similarity"))
    p.add_argument("--model", default="resnet18", help="torchvision backbone (random init)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=128, help="crop side fed to the backbone")
    p.add_argument("--finetune-steps", type=int, default=8, help="batches per worker and epoch in finetune mode")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--modes", default="head,finetune")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from artsim.config import config_from_dict, load_config
    from artsim.console import say, table
    from artsim.demo import serve_directory
    from artsim.rundir.names import model_key
    from artsim.pipeline import run_stage
    from artsim.runtime import RunContext
    from artsim.mine.corpus import normalise_creator, normalise_term
    from artsim.train.evaluate import chance_recall_at_k, recall_at_k, relevance_from_labels
    from artsim.rundir.embeddings import load_embedding_matrix

    started = time.perf_counter()
    base = load_config(REPO / "configs" / "demo.yaml")
    tree = base.to_dict()
    tree["run"]["root"] = args.root
    tree["ray"]["num_cpus"] = max(2, args.num_workers)
    tree["embed"].update(model=args.model, weights=None, image_size=args.image_size)
    tree["train"].update(epochs=args.epochs, num_workers=args.num_workers)
    results: dict = {"model": args.model, "epochs": args.epochs, "k": args.k}

    with serve_directory(REPO / "data" / "met_sample" / "images") as base_url:
        for i, source in enumerate(tree["sources"]):
            source["image_url_template"] = f"{base_url}/met_{{local_id}}.jpg"
        ctx = RunContext(config_from_dict(tree))
        for stage in ("ingest", "download", "embed"):
            run_stage(ctx, stage)
    run_stage(ctx, "mine")
    results["mine"] = ctx.storage.read_json(f"{ctx.paths.triplets}/_report.json")

    records = {r["object_id"]: r for r in ctx.storage.read_table(ctx.paths.records).to_pylist()}

    def measure(key: str) -> dict:
        ids, vectors = load_embedding_matrix(ctx.storage, ctx.paths.embeddings(key))
        creators = [[normalise_creator(records[o].get("creator"))] if normalise_creator(
            records[o].get("creator")) else [] for o in ids]
        subjects = [[normalise_term(s) for s in (records[o].get("subjects") or [])] for o in ids]
        out = {"objects": len(ids)}
        for name, labels in (("same_creator", creators), ("shared_subject", subjects)):
            rel = relevance_from_labels(labels)
            r = recall_at_k(vectors, rel, args.k)
            out[name] = {"recall": round(r["recall"], 4), "queries": r["queries"],
                         "chance": round(chance_recall_at_k(rel, args.k), 4)}
        return out

    untrained_key = model_key(ctx.config.embed)
    results["untrained"] = measure(untrained_key)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        mtree = json.loads(json.dumps(tree))
        mtree["train"].update(mode=mode, name=f"met-{mode}", batch_size=32,
                              learning_rate=1e-3 if mode == "head" else 3e-4,
                              steps_per_epoch=None if mode == "head" else args.finetune_steps)
        mctx = RunContext(config_from_dict(mtree))
        if mctx.storage.exists(mctx.paths.model(f"met-{mode}")):
            mctx.storage.delete(mctx.paths.model(f"met-{mode}"))  # measure a fresh run, not a resumed one
        t0 = time.perf_counter()
        summary = run_stage(mctx, "train")
        seconds = time.perf_counter() - t0
        etree = json.loads(json.dumps(mtree))
        etree["embed"]["weights"] = summary["export"]
        ectx = RunContext(config_from_dict(etree))
        run_stage(ectx, "embed")
        results[mode] = {**measure(model_key(ectx.config.embed)),
                         "epoch_seconds_mean": round(summary["epoch_seconds_mean"], 2),
                         "train_stage_seconds": round(seconds, 1),
                         f"val_recall@{mtree['train']['recall_k']}_untrained": summary[
                             f"val_recall@{mtree['train']['recall_k']}_untrained"],
                         f"val_recall@{mtree['train']['recall_k']}": summary[f"val_recall@{mtree['train']['recall_k']}"],
                         "train_triplets": summary["data"]["train_triplets"],
                         "validation_objects": summary["data"]["validation_objects"]}

    rows = []
    for name in ["untrained"] + [m for m in ("head", "finetune") if m in results]:
        r = results[name]
        rows.append((name, r["same_creator"]["recall"], r["shared_subject"]["recall"],
                     r.get("val_recall@10", "-") if name != "untrained" else "-",
                     r.get("epoch_seconds_mean", "-")))
    say(f"Met sample, {args.model} (random init), {args.epochs} epochs, {args.num_workers} workers, "
        f"{results['mine']['mined']} triplets mined; chance recall@{args.k}: same creator "
        f"{results['untrained']['same_creator']['chance']}, shared subject {results['untrained']['shared_subject']['chance']}")
    table(["model", f"recall@{args.k} same creator", f"recall@{args.k} shared subject",
           "held-out val recall@10", "s/epoch"], rows)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        say(f"results in {args.json}")
    say(f"plots: {ctx.paths.model('met-head')}/recall.png, {ctx.paths.model('met-finetune')}/recall.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
