"""Conditional retrieval benchmarks, as MosAIC evaluated its system: pretrained vs trained, top-1 and recall@5.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_conditional.py                  # both benchmarks
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_conditional.py --only fonts

(a) fonts: every Latin letter and digit (62 characters) rendered in every usable font installed on this machine.
    Query: a character in one test font, conditioned on another test font (``where font=<target>``); the right
    answer is the same character in the target font. The index holds every rendered glyph (>= 5,000 of them from
    test fonts alone); the filter leaves the target font's 62. MosAIC: the right image first a bit under two-thirds
    of the time (~0.63) on its 5,000-image haystack.
(b) styles: crops of the Met sample images (/work/shared/data/met_sample/images) under STYLES (colour, texture,
    blur, posterise, edges...). Query: a content under one test style, conditioned on another test style
    (``where style=<target>``); the right answer is the same content in the target style.

Training sees only TRAIN fonts (whole design groups: clones such as Arimo/Liberation Sans or TeX Gyre/URW stay
on one side) / TRAIN styles and TRAIN source images; every query and answer is TEST.

The project's own machinery, through a run directory per benchmark (benchmarks/out/conditional/<name>/run):
embeddings by artsim.models' Embedder (efficientnet_lite0 + imagenet, the offline pretrained model) written with
artsim.rundir's EmbeddingWriter; triplets (anchor: content in condition A, positive: same content in condition B,
negative: other content in condition B) in triplets/; ``run_train`` (Ray Train, residual head over the cached
embeddings, which projects every embedding through the exported head); ``run_index`` with the condition as a facet;
queries through ``ShardedIndex.search(where={facet: target})``, as ``artsim query --where`` does.

Fonts come from Debian packages (the script installs nothing; see docs/conditional.md for the apt line). It
lists the fonts it used and stops with a clear message when there are too few.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MOSAIC_TOP1 = 0.63  # MosAIC's fonts benchmark: right image first "a bit under two-thirds" of the time
MET_IMAGES = "/work/shared/data/met_sample/images"
APT_LINE = ("apt-get install -y --no-install-recommends fonts-dejavu fonts-liberation fonts-liberation2 "
            "fonts-freefont-ttf fonts-croscore fonts-crosextra-carlito fonts-crosextra-caladea fonts-urw-base35 "
            "fonts-roboto fonts-open-sans fonts-lato fonts-cantarell fonts-inconsolata fonts-linuxlibertine "
            "fonts-texgyre fonts-noto-core")


@dataclass
class Item:
    object_id: str
    condition: str  # font / style: the facet queries are conditioned on
    content: str  # what must match across conditions (a character, a crop of a picture)
    group: str  # held out whole in training validation (font design / style)
    split: str  # train / test
    render: Callable  # () -> PIL image


# -- the two data sets ----------------------------------------------------------------------------------------------
def font_items(args) -> tuple[list[Item], dict]:
    from artsim.testing.conditional import CHARACTERS, find_fonts, render_glyph, split_groups

    scan = find_fonts()
    print(f"fonts: {scan.describe()}", flush=True)
    min_test_fonts = math.ceil(args.min_haystack / len(CHARACTERS))
    if len(scan.fonts) < min_test_fonts + args.min_train_fonts:
        raise SystemExit(f"fonts: {len(scan.fonts)} usable fonts found, need at least {min_test_fonts} test fonts "
                         f"({args.min_haystack} test glyphs / {len(CHARACTERS)} characters) + "
                         f"{args.min_train_fonts} training fonts. Install more, e.g.\n  {APT_LINE}")
    train_designs, test_designs = split_groups([f.design for f in scan.fonts], args.test_fraction, args.seed,
                                               min_test_items=min_test_fonts)
    fonts = scan.fonts
    n_train = sum(f.design in train_designs for f in fonts)
    if n_train < args.min_train_fonts:
        raise SystemExit(f"fonts: only {n_train} training fonts are left after holding out {len(fonts) - n_train} "
                         f"test fonts; install more fonts:\n  {APT_LINE}")
    items = []
    size = args.image_size + 32  # the embed preprocessing centre-crops image_size of (image_size + 32)
    for i, font in enumerate(fonts):
        split = "test" if font.design in test_designs else "train"
        for c in CHARACTERS:
            items.append(Item(f"fonts:{i:03d}-{ord(c):03d}", font.name, c, font.design, split,
                              lambda p=font.path, c=c: render_glyph(p, c, size)))
    info = {"fonts": len(fonts), "train_fonts": n_train, "test_fonts": len(fonts) - n_train,
            "train_designs": sorted(train_designs), "test_designs": sorted(test_designs),
            "test_font_names": sorted(f.name for f in fonts if f.design in test_designs),
            "train_font_names": sorted(f.name for f in fonts if f.design in train_designs),
            "skipped": {k: len(v) for k, v in scan.skipped.items()}}
    print(f"fonts: train designs {sorted(train_designs)} ({n_train} fonts); test designs {sorted(test_designs)} "
          f"({len(fonts) - n_train} fonts, {(len(fonts) - n_train) * len(CHARACTERS)} test glyphs)", flush=True)
    return items, info


def style_items(args) -> tuple[list[Item], dict]:
    from PIL import Image

    from artsim.testing.conditional import STYLES, apply_style, content_crops, split_groups

    if not os.path.isdir(args.met_images):
        raise SystemExit(f"styles: {args.met_images} not found (--met-images)")
    files = sorted(f for f in os.listdir(args.met_images) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if len(files) < 10:
        raise SystemExit(f"styles: {len(files)} images in {args.met_images}; need at least 10")
    train_styles, test_styles = split_groups(list(STYLES), args.test_fraction, args.seed)
    train_pics, test_pics = split_groups(files, 0.5, args.seed)
    items = []
    size = args.image_size + 32
    crops_cache: dict = {}

    def crop(name: str, j: int):
        if name not in crops_cache:
            with Image.open(os.path.join(args.met_images, name)) as im:
                im = im.convert("RGB")
                im.thumbnail((3 * size, 3 * size))
                crops_cache[name] = [c.resize((size, size)) for c in content_crops(im, args.crops)]
        return crops_cache[name][j]

    for name in files:
        pic_split = "test" if name in test_pics else "train"
        styles = sorted(test_styles if pic_split == "test" else train_styles)
        for j in range(args.crops):
            for style in styles:
                # group = the style: the train stage's validation then holds out whole training styles, so the
                # exported epoch is the one that carries over to styles it did not train on (as the test asks)
                items.append(Item(f"styles:{os.path.splitext(name)[0]}-{j}-{style}", style,
                                  f"{name}#{j}", style, pic_split,
                                  lambda n=name, j=j, s=style: apply_style(crop(n, j), s)))
    info = {"pictures": len(files), "crops_per_picture": args.crops, "train_styles": sorted(train_styles),
            "test_styles": sorted(test_styles), "train_pictures": len(train_pics), "test_pictures": len(test_pics)}
    print(f"styles: train styles {sorted(train_styles)}; test styles {sorted(test_styles)}; "
          f"{len(train_pics)} / {len(test_pics)} train / test pictures x {args.crops} crops", flush=True)
    return items, info


# -- the pipeline ---------------------------------------------------------------------------------------------------
def make_context(root: str, facet: str, args):
    from artsim.config import config_from_dict
    from artsim.runtime import RunContext

    return RunContext(config_from_dict({
        "run": {"root": root},
        "ray": {"num_cpus": 2},
        "embed": {"model": "efficientnet_lite0", "weights": "imagenet", "image_size": args.image_size},
        "train": {"name": "conditional", "mode": "head", "head_type": "residual", "head_dim": args.rank,
                  "num_workers": 1, "cpus_per_worker": 1, "epochs": args.epochs, "batch_size": args.batch_size,
                  "learning_rate": args.learning_rate, "margin": args.margin, "mining": "none",
                  "validation_fraction": 0.2, "select_by": "criteria", "recall_k": 5, "seed": args.seed,
                  "project_embeddings": True},
        "index": {"facets": [facet], "metadata": ["title"]},
    }))


def write_records(ctx, items: list[Item], facet: str, collection: str) -> None:
    import pyarrow as pa

    from artsim.rundir.schema import empty_record, records_table

    rows = []
    for it in items:
        r = empty_record()
        r.update(object_id=it.object_id, collection=collection, local_id=it.object_id.split(":", 1)[1],
                 title=f"{it.content} / {it.condition}", creator=it.group, object_type=it.split)
        rows.append(r)
    table = records_table(rows).append_column(facet, pa.array([it.condition for it in items], pa.string()))
    ctx.storage.write_table(table, ctx.paths.records)


def embed_items(ctx, items: list[Item], threads: int) -> tuple[str, float]:
    """Every item's image through the Embedder into embeddings/<model_key>/ (as the embed stage writes it)."""
    import torch

    from artsim.models.embedder import build_embedder
    from artsim.rundir.embeddings import EmbeddingWriter
    from artsim.rundir.names import model_key
    from artsim.storage import join

    torch.set_num_threads(threads)
    embed_cfg = ctx.config.embed
    embedder = build_embedder(embed_cfg, ctx.storage)
    key = model_key(embed_cfg)
    uri = ctx.paths.embeddings(key)
    started = time.perf_counter()
    with ctx.storage.atomic_dir(uri) as staging:
        writer = EmbeddingWriter(ctx.storage, staging, key, embedder.spec.output_dim, embed_cfg.dtype)
        batch = 128
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            vectors = embedder.embed_pil([it.render() for it in chunk])
            writer.add([it.object_id for it in chunk], vectors, [None] * len(chunk))
            done = start + len(chunk)
            if done % (batch * 10) == 0 or done == len(items):
                rate = done / (time.perf_counter() - started)
                print(f"  embedded {done}/{len(items)} ({rate:.0f} images/s)", flush=True)
        writer.close()
        ctx.storage.write_json(join(staging, "_model.json"), embedder.describe() | {"dtype": embed_cfg.dtype,
                                                                                    "precision": "fp32"})
    return key, time.perf_counter() - started


def write_triplets(ctx, items: list[Item], per_item: int, seed: int) -> int:
    """Training triplets over TRAIN items only: anchor = content x in condition A, positive = x in condition B,
    negative = another content in condition B (what the conditioned search has to tell apart)."""
    import pyarrow as pa

    from artsim.rundir.schema import TRIPLETS_SCHEMA

    rng = np.random.default_rng(seed)
    train = [it for it in items if it.split == "train"]
    by_content: dict = {}
    by_condition: dict = {}
    for it in train:
        by_content.setdefault(it.content, []).append(it)
        by_condition.setdefault(it.condition, []).append(it)
    rows = {"anchor_id": [], "positive_id": [], "negative_id": [], "reason": [], "strategy": []}
    for it in train:
        others = [o for o in by_content[it.content] if o.condition != it.condition]
        if not others:
            continue
        for _ in range(per_item):
            pos = others[int(rng.integers(0, len(others)))]
            candidates = by_condition[pos.condition]
            neg = candidates[int(rng.integers(0, len(candidates)))]
            while neg.content == it.content:
                neg = candidates[int(rng.integers(0, len(candidates)))]
            rows["anchor_id"].append(it.object_id)
            rows["positive_id"].append(pos.object_id)
            rows["negative_id"].append(neg.object_id)
            rows["reason"].append(f"same content: {it.content}")
            rows["strategy"].append("conditional benchmark")
    table = pa.Table.from_pydict(rows, schema=TRIPLETS_SCHEMA)
    ctx.storage.write_table(table, ctx.paths.triplets)
    return table.num_rows


def build_index(ctx, embeddings_key: str, name: str) -> str:
    import dataclasses

    from artsim.index.stage import run_index

    cfg = dataclasses.replace(ctx.config.index, embeddings=embeddings_key, name=name)
    ctx.config = dataclasses.replace(ctx.config, index=cfg)
    return run_index(ctx)["index_uri"]


def evaluate(index_uri: str, items: list[Item], facet: str, k: int, seed: int, max_queries: int) -> dict:
    """Conditional queries over TEST items: each test item as a query conditioned on a random other test
    condition (fixed seed); the answer is the same content in that condition."""
    from artsim.serving import ShardedIndex
    from artsim.testing.conditional import conditional_hits, pick_targets

    test = [it for it in items if it.split == "test"]
    conditions = sorted({it.condition for it in test})
    answer_of = {(it.content, it.condition): it.object_id for it in test}
    targets = pick_targets(len(test), conditions, lambda i: test[i].condition, seed)
    queries = [(q, t) for q, t in zip(test, targets) if (q.content, t) in answer_of]
    if max_queries and len(queries) > max_queries:
        pick = np.random.default_rng(seed + 1).choice(len(queries), max_queries, replace=False)
        queries = [queries[i] for i in sorted(pick)]
    index = ShardedIndex.open(index_uri)
    try:
        haystack = len(index.object_ids())
        by_target: dict = {}
        for q, t in queries:
            by_target.setdefault(t, []).append(q)
        ranked, answers, candidates = [], [], []
        started = time.perf_counter()
        for target, qs in sorted(by_target.items()):
            vectors = index.vectors_for_ids([q.object_id for q in qs])
            hits = index.search(vectors, k=k, where={facet: target})
            for q, row in zip(qs, hits):
                ranked.append([h["object_id"] for h in row])
                answers.append(answer_of[(q.content, target)])
            candidates.append(sum(1 for it in test if it.condition == target))
        seconds = time.perf_counter() - started
    finally:
        index.close()
    scores = conditional_hits(ranked, answers, k)
    scores.update(haystack=haystack, test_items=len(test), test_conditions=len(conditions),
                  candidates_per_condition=float(np.mean(candidates)), chance_top1=1.0 / float(np.mean(candidates)),
                  query_seconds=round(seconds, 2))
    return scores


def run_benchmark(name: str, items: list[Item], facet: str, info: dict, args) -> dict:
    from artsim.runtime import ensure_ray
    from artsim.train.stage import run_train

    root = os.path.join(args.out, name, "run")
    if os.path.exists(root):
        shutil.rmtree(root)
    ctx = make_context(root, facet, args)
    t0 = time.perf_counter()
    print(f"{name}: {len(items)} images ({sum(it.split == 'test' for it in items)} test), "
          f"{args.image_size} px, run directory {root}", flush=True)
    write_records(ctx, items, facet, name)
    key, embed_seconds = embed_items(ctx, items, args.threads)
    n_triplets = write_triplets(ctx, items, args.triplets_per_item, args.seed)
    print(f"{name}: {n_triplets} training triplets over {sum(it.split == 'train' for it in items)} train images",
          flush=True)
    for attempt in range(3):  # Ray gives its raylet 30 s to register: not always enough on a loaded 2-core machine
        try:
            ensure_ray(ctx.config)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            print(f"{name}: Ray did not start in time ({exc}); trying again", flush=True)
            import ray

            ray.shutdown()
    t1 = time.perf_counter()
    train = run_train(ctx)
    train_seconds = time.perf_counter() - t1
    trained_key = os.path.basename(train["projected_embeddings"].rstrip("/"))
    results = {}
    for label, emb_key in (("pretrained", key), ("trained", trained_key)):
        uri = build_index(ctx, emb_key, f"{name}-{label}")
        results[label] = evaluate(uri, items, facet, args.k, args.seed, args.max_queries)
        print(f"{name} {label}: {json.dumps(results[label])}", flush=True)
    return {"benchmark": name, "images": len(items), "image_size": args.image_size, "info": info,
            "embed_seconds": round(embed_seconds, 1), "train_seconds": round(train_seconds, 1),
            "train": {k: train.get(k) for k in ("best_epoch", "epochs", "verdict", "data", "validation")},
            "triplets": n_triplets, "results": results, "seconds": round(time.perf_counter() - t0, 1)}


def print_table(reports: list[dict], k: int) -> None:
    print("\nconditional retrieval (test conditions and contents disjoint from training)")
    print(f"{'benchmark':<10} {'haystack':>8} {'cands':>6} {'queries':>7} {'chance':>7} "
          f"{'pretrained top-1':>17} {'trained top-1':>14} {f'pretrained R@{k}':>14} {f'trained R@{k}':>11}  reference")
    for r in reports:
        p, t = r["results"]["pretrained"], r["results"]["trained"]
        ref = f"MosAIC top-1 ~{MOSAIC_TOP1:.2f}" if r["benchmark"] == "fonts" else ""
        print(f"{r['benchmark']:<10} {p['haystack']:>8} {p['candidates_per_condition']:>6.0f} {p['queries']:>7} "
              f"{p['chance_top1']:>7.3f} {p['top1']:>17.3f} {t['top1']:>14.3f} {p[f'recall@{k}']:>14.3f} "
              f"{t[f'recall@{k}']:>11.3f}  {ref}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("fonts", "styles"), help="run one benchmark (default: both)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "conditional"))
    ap.add_argument("--image-size", type=int, default=64, help="crop side fed to the model (px)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for embedding (1 is fastest on a "
                                                          "loaded 2-core machine)")
    ap.add_argument("--min-haystack", type=int, default=5000, help="fonts: least number of TEST glyphs")
    ap.add_argument("--min-train-fonts", type=int, default=40)
    ap.add_argument("--test-fraction", type=float, default=0.4)
    ap.add_argument("--crops", type=int, default=5, help="styles: contents per Met picture")
    ap.add_argument("--met-images", default=MET_IMAGES)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--rank", type=int, default=256, help="rank of the residual head")
    ap.add_argument("--triplets-per-item", type=int, default=4)
    ap.add_argument("--max-queries", type=int, default=0, help="0: every test item is a query once")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")  # Ray workers import artsim
    os.makedirs(args.out, exist_ok=True)
    reports = []
    for name, builder, facet in (("fonts", font_items, "font"), ("styles", style_items, "style")):
        if args.only and args.only != name:
            continue
        items, info = builder(args)
        reports.append(run_benchmark(name, items, facet, info, args))
    print_table(reports, args.k)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "reports": reports}, f, indent=1)
    print(f"\nresults: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
