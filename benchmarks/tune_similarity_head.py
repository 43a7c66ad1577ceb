"""How the defaults of benchmarks/measure_similarity.py were chosen: head training on creator splits that are *not*
published, every epoch measured on validation (train side) and test side, so that selection rules and settings can
be compared without touching the published split (seed 0) or the untuned check splits (4, 5, 6).

A single-process copy of the train stage's head mode (the product's prepare_training_data, residual head, triplet
loss with semi-hard mining, preserve_neighbourhoods term and validation; one worker, batch 128 = 2 workers x 64,
torch on one thread) -- seconds per run instead of Ray Train's minute. Needs the ingest/download/embed of an earlier
`measure_similarity.py` run in its --root; mines each split's train side once (cached).

    .venv/bin/python benchmarks/tune_similarity_head.py [--seeds 1,2,3] [--json tune.json]

Prints, per configuration and selection rule (criteria_and_creator, every_metric, last epoch), the mean and worst
change from the pretrained model on the test sides (same-creator recall@10, object-type and shared-subject
precision@10). 2026-12-01: 16 configurations x 3 seeds in ~12 min on 2 shared cores.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

torch.set_num_threads(1)  # two threads per process on 2 shared cores made every run ~20x slower

import measure_similarity as ms  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from artsim.config import config_from_dict  # noqa: E402
from artsim.mine.corpus import normalise_term  # noqa: E402
from artsim.pipeline import run_stage  # noqa: E402
from artsim.rundir.embeddings import load_embedding_matrix  # noqa: E402
from artsim.rundir.names import model_key, normalise_creator  # noqa: E402
from artsim.runtime import RunContext  # noqa: E402
from artsim.train.data import epoch_batches, prepare_training_data  # noqa: E402
from artsim.train.evaluate import recall_at_k, relevance_from_labels  # noqa: E402
from artsim.train.losses import neighbourhood_loss, positive_pair_keys, triplet_loss, valid_negative_mask  # noqa: E402
from artsim.train.models import HeadModel, head_description  # noqa: E402
from artsim.train.ray_train import _evaluate  # noqa: E402
from artsim.train.selection import is_new_best, validation_score  # noqa: E402

ROOT = REPO / "artifacts" / "measure_similarity"
tree = ctx = storage = records = ids = pretrained = pos_of = None
K = 10


def load(root: Path) -> None:
    global ROOT, tree, ctx, storage, records, ids, pretrained, pos_of
    ROOT = root
    # already downloaded by measure_similarity.py: these URLs are never fetched here
    sources = ms.met_sources("http://127.0.0.1:1", "http://127.0.0.1:1")
    tree = {"run": {"root": str(ROOT / "all")}, "ray": {"num_cpus": 2},
            "sources": sources, "embed": {"model": "efficientnet_lite0", "weights": "imagenet", "batch_size": 16},
            "download": {"image_size": 384, "allow_private_addresses": False, "allow_hosts": ["127.0.0.1"]}}
    ctx = RunContext(config_from_dict(tree))
    storage = ctx.storage
    records = {r["object_id"]: r for r in storage.read_table(ctx.paths.records).to_pylist()}
    ids, pretrained = load_embedding_matrix(storage, ctx.paths.embeddings(model_key(ctx.config.embed)))
    pos_of = {o: i for i, o in enumerate(ids)}


def triplets_for(seed, strategies, n=20000):
    tag = f"s{seed}-" + "+".join(sorted(strategies))
    troot = ROOT / "tune" / tag
    side = {o: ms.side_of(normalise_creator(records[o].get("creator")), o, seed) for o in ids}
    train_ids = sorted(o for o in ids if side[o] == "train")
    test_ids = [o for o in ids if side[o] == "test"]
    ttree = json.loads(json.dumps(tree)); ttree["run"]["root"] = str(troot)
    ttree["mine"] = {"num_triplets": n, "strategies": {s: 1.0 for s in strategies},
                     "term_fields": ["subjects", "concepts", "object_type", "medium"]}
    tctx = RunContext(config_from_dict(ttree))
    if not tctx.storage.exists(tctx.paths.triplets + "/_report.json"):
        keep = pa.array(train_ids, pa.string())
        tctx.storage.write_table(storage.read_table(ctx.paths.records).filter(
            pc.is_in(pc.field("object_id"), value_set=keep)), tctx.paths.records)
        run_stage(tctx, "mine")
    tab = tctx.storage.read_table(tctx.paths.triplets).to_pylist()
    rep = tctx.storage.read_json(tctx.paths.triplets + "/_report.json")
    per = {k: v.get("mined", v.get("count")) for k, v in rep["strategies"].items()}
    return train_ids, test_ids, tab, per


def test_measure(test_ids):
    creators = [normalise_creator(records[o].get("creator")) for o in test_ids]
    types = [ms.normalise_type(records[o].get("object_type")) for o in test_ids]
    subjects = [{normalise_term(s) for s in (records[o].get("subjects") or []) if s} for o in test_ids]
    crel = relevance_from_labels([[c] if c else [] for c in creators])
    tl = [{x} if x else set() for x in types]

    def measure(v):
        return (recall_at_k(v, crel, K)["recall"], ms.precision_at_k(v, tl, K)["precision"],
                ms.precision_at_k(v, subjects, K)["precision"])
    return measure


def run(seed, strategies, lr=1e-3, epochs=10, rank=64, vf=0.2, mining="semi_hard", batch=128, preserve=0.0,
        wd_identity=0.0, train_seed=0):
    train_ids, test_ids, tri, per = triplets_for(seed, strategies)
    creators = {o: normalise_creator(records[o].get("creator")) for o in train_ids}
    creators = {o: c for o, c in creators.items() if c}
    data = prepare_training_data([t["anchor_id"] for t in tri], [t["positive_id"] for t in tri],
                                 [t["negative_id"] for t in tri], [t["reason"] for t in tri], set(ids), vf, train_seed,
                                 groups=creators)
    feats = torch.from_numpy(np.ascontiguousarray(pretrained[[pos_of[o] for o in data.object_ids]]))
    test_pos = [pos_of[o] for o in test_ids]
    test_x = torch.from_numpy(pretrained[test_pos])
    measure = test_measure(test_ids)
    torch.manual_seed(train_seed)
    model = HeadModel(head_description(feats.shape[1], rank, [], head_type="residual"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    encode = lambda objs, training, module=None: (module or model)(feats[torch.from_numpy(objs)])
    pk = positive_pair_keys(data.anchors, data.positives, data.n_objects)
    hist = []

    def snap(epoch, extra):
        model.eval()
        with torch.no_grad():
            tv = model(test_x).numpy()
        m = _evaluate(encode, model, data, K, 0.2)
        m.update(extra); m["epoch"] = epoch; m["test"] = measure(tv)
        hist.append(m)
    snap(0, {})
    for epoch in range(1, epochs + 1):
        model.train()
        for b in epoch_batches(len(data.anchors), batch, epoch, train_seed, 0, 1):
            a, p, n = data.anchors[b], data.positives[b], data.negatives[b]
            objs, inv = np.unique(np.concatenate([a, p, n]), return_inverse=True)
            m = len(b)
            ai, pi, ni = (torch.from_numpy(inv[i * m:(i + 1) * m]) for i in range(3))
            emb = encode(objs, True)
            valid = torch.from_numpy(valid_negative_mask(a, p, objs, pk, data.n_objects)) if mining != "none" else None
            loss, _ = triplet_loss(emb, ai, pi, ni, 0.2, mining, valid)
            if preserve:
                loss = loss + preserve * neighbourhood_loss(emb, torch.nn.functional.normalize(
                    feats[torch.from_numpy(objs)], dim=1))
            opt.zero_grad(); loss.backward(); opt.step()
        snap(epoch, {})
    return {"seed": seed, "per": per, "stats": data.stats, "hist": hist}



def pick(hist, rule):
    if rule == "last":
        return hist[-1]
    start = hist[0]
    best, best_score = start, validation_score(start, K, rule)
    for h in hist[1:]:
        if is_new_best(h, start, best_score, K, rule):
            best, best_score = h, validation_score(h, K, rule)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT))
    p.add_argument("--seeds", default="1,2,3", help="creator splits to tune on (never the published 0 or 4-6)")
    p.add_argument("--json", default=None, help="per-epoch results (kept: reruns skip configurations in it)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if {0, 4, 5, 6} & set(seeds):
        print("refusing to tune on the published split 0 or the check splits 4-6")
        return 2
    load(Path(args.root))
    grid = [{"seed": seed, "strategies": st, "preserve": pr, "lr": lr, "epochs": 10}
            for seed, st, pr, lr in itertools.product(seeds, (["shared_terms", "text"],
                                                             ["same_creator", "shared_terms", "text"]),
                                                      (0.0, 1.0, 3.0, 10.0), (1e-3, 3e-4))]
    out = Path(args.json) if args.json else None
    res = json.loads(out.read_text()) if out and out.exists() else {}
    for c in grid:
        name = json.dumps(c, sort_keys=True)
        if name not in res:
            t0 = time.time()
            res[name] = run(**c)
            res[name]["seconds"] = time.time() - t0
            print(name, f"{res[name]['seconds']:.0f} s", flush=True)
            if out:
                out.write_text(json.dumps(res, default=str))
    agg: dict = {}
    for name, r in res.items():
        c = json.loads(name)
        base = np.array(r["hist"][0]["test"])
        for rule in ("criteria_and_creator", "every_metric", "last"):
            key = (json.dumps({k: v for k, v in c.items() if k != "seed"}, sort_keys=True), rule)
            agg.setdefault(key, []).append(np.array(pick(r["hist"], rule)["test"]) - base)
    print("change from pretrained on the test sides (same creator, object type, subject):")
    for (cfg, rule), ds in sorted(agg.items()):
        ds = np.array(ds)
        print(f"{cfg} {rule:22s} n={len(ds)} mean {np.round(ds.mean(0), 3)} worst {np.round(ds.min(0), 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
