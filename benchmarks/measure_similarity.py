"""Does training help on works by creators it never saw? Real Met works, split by creator.

Collection: data/met_sample (80 works) + ../shared/data/met_more (388 works, creators disjoint from met_sample),
ingested from their four files (Met API JSON and 2013-scrape CSV of each) and downloaded from loopback servers,
embedded with EfficientNet-Lite0 and its packaged ImageNet weights (no network). The creators are split in two by
a stable hash (works without a known creator by their id): mine + train see only the *train* side; everything is
measured on the *test* side, whose creators training never saw:

- same-creator recall@k: the other works by the query's creator in the top k (recall_at_k);
- object-type precision@k: the share of the top k with the query's object type (normalised: "Paintings" and
  "Painting" are one type; the scrape's types are coarse: Metal, Clay, Sculpture, ...);
- shared-subject precision@k: the share of the top k that shares a subject tag with the query, among the test
  works that have tags (Met API tags, the 2013 scrape's what_terms).

Models side by side: colour histograms (8x8x8 RGB, Hellinger), pretrained (the backbone's features), head
(`train.mode: head`, residual head by default) and finetune (`train.mode: finetune`, backbone + residual head). The
train stage picks its exported epoch on held-out creators *of the train side* (never the test side; by default
`select_by: every_metric`: no validation metric below the start). Mining: `shared_terms` + `text` + `same_creator`
by default, its per-strategy triplet counts printed. The defaults (strategies, learning rate) were chosen on creator
splits 1-3 with benchmarks/tune_similarity_head.py; this script reports the published split (--split-seed 0, head and
finetune) and, in head mode, the untuned splits --other-seeds (4, 5, 6) with their mean and worst change.

    .venv/bin/python benchmarks/measure_similarity.py [--reuse] [--json OUT]

Everything is seeded; numbers move only with CPU timing (finetune batches run in threads).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MET_SAMPLE = REPO / "data" / "met_sample"
MET_MORE = REPO.parent / "shared" / "data" / "met_more"


def normalise_type(value) -> str | None:
    if not value:
        return None
    key = str(value).split(",")[0].strip().casefold()
    return key[:-1] if key.endswith("s") and len(key) > 3 else key or None


def met_sources(sample_url: str, more_url: str) -> list[dict]:
    """The four source files of met_sample + met_more (Met API JSON and 2013-scrape CSV of each), their images served
    from ``sample_url`` / ``more_url``."""
    scrape_mapping = {"local_id": "object_id", "title": "title", "creator": "artist", "date": "date",
                      "medium": "medium", "object_type": "object_type"}
    sources = [
        {"kind": "met_api_json", "path": str(MET_SAMPLE / "met_api_objects.json"), "collection": "met"},
        {"kind": "table", "path": str(MET_SAMPLE / "met_2013_scrape.csv"), "collection": "met2013",
         "license": "CC0", "mapping": {**scrape_mapping, "subjects": "what_terms"}},
        {"kind": "met_api_json", "path": str(MET_MORE / "met_api_objects.json"), "collection": "metmore"},
        {"kind": "table", "path": str(MET_MORE / "met_2013_scrape.csv"), "collection": "metmore2013",
         "license": "CC0", "mapping": scrape_mapping}]
    for source, url in zip(sources, [sample_url, sample_url, more_url, more_url]):
        source["image_url_template"] = f"{url}/met_{{local_id}}.jpg"
    return sources


def colour_histograms(images: list[bytes], bins: int = 8) -> np.ndarray:
    """8x8x8 RGB histograms of the 128 px thumbnails, square-rooted (Hellinger) and L2-normalised."""
    from artsim.models.preprocess import decode_rgb

    out = np.zeros((len(images), bins ** 3), np.float32)
    for i, data in enumerate(images):
        img = decode_rgb(data, 128)
        img.thumbnail((128, 128))
        px = (np.asarray(img, np.uint16) * bins // 256).reshape(-1, 3)
        idx = px[:, 0] * bins * bins + px[:, 1] * bins + px[:, 2]
        out[i] = np.bincount(idx, minlength=bins ** 3)
    out = np.sqrt(out / out.sum(1, keepdims=True))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def precision_at_k(vectors: np.ndarray, labels: list[set], k: int, pool: np.ndarray | None = None) -> dict:
    """Mean share of each query's top k (itself excluded) that shares a label with it; queries and candidates are
    the items of ``pool`` (all by default) that have labels."""
    import faiss

    items = np.array([i for i in (range(len(labels)) if pool is None else pool) if labels[i]], dtype=np.int64)
    if len(items) < 2:
        return {"precision": float("nan"), "queries": 0, "chance": float("nan")}
    v = np.ascontiguousarray(vectors[items], dtype=np.float32)
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    _, hits = index.search(v, min(k + 1, len(items)))
    scores, chance = [], []
    for q, row in enumerate(hits):
        top = [int(h) for h in row if h != q and h >= 0][:k]
        mine = labels[items[q]]
        scores.append(np.mean([bool(mine & labels[items[j]]) for j in top]))
        chance.append(np.mean([bool(mine & labels[items[j]]) for j in range(len(items)) if j != q]))
    return {"precision": float(np.mean(scores)), "queries": len(items), "chance": float(np.mean(chance))}


def side_of(creator: str | None, object_id: str, seed: int) -> str:
    key = f"creator:{creator}" if creator else f"object:{object_id}"
    h = int.from_bytes(hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()[:8], "little") / 2.0 ** 64
    return "train" if h < 0.5 else "test"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "artifacts" / "measure_similarity"))
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--epochs", type=int, default=10, help="head mode epochs")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-steps", type=int, default=8, help="batches per worker and epoch in finetune mode")
    p.add_argument("--num-triplets", type=int, default=20000)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--split-seed", type=int, default=0, help="the published creator split")
    p.add_argument("--other-seeds", default="4,5,6",
                   help="more creator splits, head mode only, summarised as a mean (choices were tuned on seeds 1-3, "
                        "never on these or on --split-seed); '' for none")
    p.add_argument("--modes", default="head,finetune")
    p.add_argument("--strategies", default="shared_terms,text,same_creator", help="mine strategies (equal weights)")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="head mode (finetune: 0.3x)")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--select-by", default=None, help="train.select_by (default: the train stage's default)")
    p.add_argument("--preserve", type=float, default=None,
                   help="train.preserve_neighbourhoods (default: the train stage's default)")
    p.add_argument("--reuse", action="store_true", help="keep ingest/download/embed of an earlier run in --root")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from artsim.config import EmbedConfig, config_from_dict
    from artsim.console import say, table
    from artsim.demo import serve_directory
    from artsim.models.artifact import load_artifact
    from artsim.models.embedder import build_embedder
    from artsim.models.heads import build_head
    from artsim.rundir.names import model_key
    from artsim.pipeline import run_stage
    from artsim.runtime import RunContext
    from artsim.mine.corpus import normalise_term
    from artsim.rundir.names import normalise_creator
    from artsim.train.evaluate import chance_recall_at_k, recall_at_k, relevance_from_labels
    from artsim.rundir.embeddings import load_embedding_matrix

    started = time.perf_counter()
    if not MET_MORE.exists():
        say(f"{MET_MORE} not found: this benchmark needs the shared met_more data")
        return 2
    embed = {"model": args.model, "weights": args.weights, "batch_size": 16}
    results: dict = {"model": f"{args.model} ({args.weights})", "k": args.k, "split_seed": args.split_seed,
                     "args": vars(args)}

    with serve_directory(MET_SAMPLE / "images") as sample_url, serve_directory(MET_MORE / "images") as more_url:
        sources = met_sources(sample_url, more_url)
        tree = {"run": {"root": str(Path(args.root) / "all")}, "ray": {"num_cpus": max(2, args.num_workers)},
                "sources": sources, "embed": embed,
                "download": {"image_size": 384, "allow_private_addresses": False, "allow_hosts": ["127.0.0.1"]}}
        ctx = RunContext(config_from_dict(tree))
        if not (args.reuse and ctx.storage.is_complete(ctx.paths.embeddings(model_key(ctx.config.embed)))):
            for stage in ("ingest", "download", "embed"):
                run_stage(ctx, stage)

    storage = ctx.storage
    records = {r["object_id"]: r for r in storage.read_table(ctx.paths.records).to_pylist()}
    images_table = storage.read_table(ctx.paths.images)
    images = {r["object_id"]: r["image"] for r in images_table.select(["object_id", "status", "image"]).to_pylist()
              if r["status"] == "ok" and r["image"]}
    ids, pretrained = load_embedding_matrix(storage, ctx.paths.embeddings(model_key(ctx.config.embed)))
    row_of = {o: i for i, o in enumerate(ids)}
    creator_of = {o: normalise_creator(records[o].get("creator")) for o in ids}

    def run_split(seed: int, modes: list[str]) -> dict:
        """Mine + train on the train side of creator split ``seed``; measure every model on its test side."""
        side = {o: side_of(creator_of[o], o, seed) for o in ids}
        test_ids = [o for o in ids if side[o] == "test"]
        train_ids = set(o for o in ids if side[o] == "train")
        test_pos = np.array([row_of[o] for o in test_ids])
        creators = [creator_of[o] for o in test_ids]
        types = [normalise_type(records[o].get("object_type")) for o in test_ids]
        subjects = [{normalise_term(s) for s in (records[o].get("subjects") or []) if s} for o in test_ids]
        creator_rel = relevance_from_labels([[c] if c else [] for c in creators])
        out: dict = {"split_seed": seed, "split": {
            "works": len(ids), "train_works": len(train_ids), "test_works": len(test_ids),
            "train_creators": len({creator_of[o] for o in train_ids} - {None}),
            "test_creators": len(set(creators) - {None}),
            "test_same_creator_queries": sum(1 for r in creator_rel if r),
            "test_works_with_tags": sum(1 for s in subjects if s)}}

        def measure(vectors: np.ndarray) -> dict:
            r = recall_at_k(vectors, creator_rel, args.k)
            t = precision_at_k(vectors, [{x} if x else set() for x in types], args.k)
            s = precision_at_k(vectors, subjects, args.k)
            return {"same_creator_recall": r["recall"], "object_type_precision": t["precision"],
                    "shared_subject_precision": s["precision"], "queries": [r["queries"], t["queries"], s["queries"]],
                    "chance": [chance_recall_at_k(creator_rel, args.k), t["chance"], s["chance"]]}

        test_images = [images[o] for o in test_ids]
        models = {"colour histogram": measure(colour_histograms(test_images)),
                  "pretrained": measure(pretrained[test_pos])}

        # The train side only: its records, images and cached embeddings in a run directory of its own.
        troot = str(Path(args.root) / ("train-side" if seed == args.split_seed else f"train-side-s{seed}"))
        ttree = json.loads(json.dumps(tree))
        ttree["run"]["root"] = troot
        ttree["mine"] = {"num_triplets": args.num_triplets,
                         "strategies": {name.strip(): 1.0 for name in args.strategies.split(",") if name.strip()},
                         "term_fields": ["subjects", "concepts", "object_type", "medium"]}
        tctx = RunContext(config_from_dict(ttree))
        keep = pa.array(sorted(train_ids), pa.string())
        tctx.storage.write_table(storage.read_table(ctx.paths.records).filter(
            pc.is_in(pc.field("object_id"), value_set=keep)), tctx.paths.records)
        tctx.storage.write_table(images_table.filter(pc.is_in(pc.field("object_id"), value_set=keep)),
                                 tctx.paths.images)
        key = model_key(ctx.config.embed)
        emb = storage.read_table(ctx.paths.embeddings(key))
        tctx.storage.write_table(emb.filter(pc.is_in(pc.field("object_id"), value_set=keep)),
                                 tctx.paths.embeddings(key))
        tctx.storage.write_json(f"{tctx.paths.embeddings(key)}/_model.json",
                                storage.read_json(f"{ctx.paths.embeddings(key)}/_model.json"))
        mine = run_stage(tctx, "mine")
        mine_report = tctx.storage.read_json(f"{tctx.paths.triplets}/_report.json")
        out["mine"] = {"triplets": mine.get("triplets"), "per_strategy": {
            name: s.get("mined", s.get("count")) for name, s in (mine_report.get("strategies") or {}).items()}}

        training = {}
        for mode in modes:
            mtree = json.loads(json.dumps(ttree))
            mtree["train"] = {"mode": mode, "name": f"met-{mode}", "num_workers": args.num_workers,
                              "epochs": args.epochs if mode == "head" else args.finetune_epochs,
                              "batch_size": 64 if mode == "head" else 16, "mining": "semi_hard",
                              "head_dim": 64, "validation_fraction": args.validation_fraction,
                              "learning_rate": args.learning_rate if mode == "head" else args.learning_rate * 0.3,
                              "steps_per_epoch": None if mode == "head" else args.finetune_steps}
            if args.select_by:
                mtree["train"]["select_by"] = args.select_by
            if args.preserve is not None:
                mtree["train"]["preserve_neighbourhoods"] = args.preserve
            mctx = RunContext(config_from_dict(mtree))
            if mctx.storage.exists(mctx.paths.model(f"met-{mode}")):
                mctx.storage.delete(mctx.paths.model(f"met-{mode}"))  # measure a fresh run, not a resumed one
            t0 = time.perf_counter()
            summary = run_stage(mctx, "train")
            seconds = time.perf_counter() - t0
            if mode == "head":
                spec, _, head_state, _ = load_artifact(mctx.storage, summary["export"])
                head = build_head(spec.head)
                head.load_state_dict(head_state)
                with torch.no_grad():
                    vectors = torch.nn.functional.normalize(head(torch.from_numpy(pretrained[test_pos])),
                                                            dim=1).numpy()
            else:
                embedder = build_embedder(EmbedConfig(model=args.model, weights=summary["export"]), mctx.storage)
                vectors = np.concatenate([embedder.embed_bytes(test_images[i:i + 32])
                                          for i in range(0, len(test_images), 32)])
            models[mode] = measure(vectors)
            training[mode] = {"seconds": round(seconds, 1), "validation": summary["validation"],
                              "exported_epoch": summary["exported_epoch"], "verdict": summary["verdict"],
                              "train_triplets": summary["data"]["train_triplets"],
                              "held_out_groups": summary["data"].get("held_out_groups"),
                              "validation_creator_queries": summary["data"].get("validation_creator_queries"),
                              "validation_criteria": summary["data"].get("validation_criteria")}
        out["models"] = models
        out["training"] = training
        return out

    import pyarrow as pa
    import pyarrow.compute as pc

    metrics = ("same_creator_recall", "object_type_precision", "shared_subject_precision")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        if args.json:  # after every split: a long run that is stopped still leaves what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")

    # head mode everywhere first (minutes), finetune of the published split last (the slow part on CPU)
    published = run_split(args.split_seed, [m for m in modes if m == "head"])
    results.update(published)
    save()
    other_seeds = [int(x) for x in args.other_seeds.split(",") if x.strip()]
    others = [run_split(seed, ["head"]) for seed in other_seeds] if "head" in modes else []
    if others:
        results["other_splits"] = others
        save()
    if "finetune" in modes:
        finetuned = run_split(args.split_seed, ["finetune"])
        published["models"]["finetune"] = finetuned["models"]["finetune"]
        published["training"]["finetune"] = finetuned["training"]["finetune"]
        results.update(published)
    models, training = published["models"], published["training"]
    say(f"Met sample + met_more, split by creator (seed {args.split_seed}): train side "
        f"{published['split']['train_works']} works ({published['split']['train_creators']} creators), measured on "
        f"the test side: {published['split']['test_works']} works by {published['split']['test_creators']} other "
        f"creators")
    table(["strategy", "triplets mined (train side)"], sorted(published["mine"]["per_strategy"].items()))
    rows = [(name, *(round(m[x], 3) for x in metrics)) for name, m in models.items()]
    chance = models["pretrained"]["chance"]
    rows.append(("chance", *(round(c, 3) for c in chance)))
    header = ["model", f"same-creator recall@{args.k}", f"object-type precision@{args.k}",
              f"shared-subject precision@{args.k}"]
    table(header, rows)
    for mode, t in training.items():
        say(f"{mode}: {t['verdict']} (train-side validation score start {t['validation']['start']['val_score']}, "
            f"best {t['validation']['best']['val_score']}, last {t['validation']['last']['val_score']}; "
            f"{t['seconds']} s)")

    if others:
        summary_rows = []
        for name in ("pretrained", "head"):
            values = np.array([[o["models"][name][x] for x in metrics] for o in others])
            summary_rows.append((f"{name}: mean", *np.round(values.mean(0), 3)))
        deltas = np.array([[o["models"]["head"][x] - o["models"]["pretrained"][x] for x in metrics] for o in others])
        summary_rows.append(("head - pretrained: mean", *np.round(deltas.mean(0), 3)))
        summary_rows.append(("head - pretrained: worst split", *np.round(deltas.min(0), 3)))
        results["other_splits_summary"] = {"seeds": other_seeds, "mean_delta": deltas.mean(0).tolist(),
                                           "min_delta": deltas.min(0).tolist()}
        say(f"head mode on {len(others)} other creator splits (seeds {other_seeds}; triplets per strategy: "
            + "; ".join(f"{o['split_seed']}: {o['mine']['per_strategy']}" for o in others) + ")")
        table(header, summary_rows)
        for o in others:
            say(f"  seed {o['split_seed']}: {o['training']['head']['verdict']}; head - pretrained "
                + ", ".join(f"{x} {o['models']['head'][x] - o['models']['pretrained'][x]:+.3f}" for x in metrics))
    save()
    if args.json:
        say(f"results in {args.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
