"""The train stage: triplets/ + embeddings (head mode) or images (finetune mode) -> models/<train.name>/.

models/<name>/ holds Ray Train's run directory (checkpoint_* every epoch, its snapshot for resumption), and:
    export/         the artifact (artsim.models.artifact) that ``embed.weights: <this URI>`` accepts
    history.json    metrics per epoch (epoch 0 = the untrained model), sessions (restarts), data statistics
    recall.png      validation recall@k and losses per epoch

Submitting the job again with the same train.name resumes from the last checkpoint (train.epochs may be raised
to train further); a worker failure restarts the workers from the last checkpoint (train.max_failures).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time

import numpy as np
import pyarrow as pa

from artsim.config import TrainConfig
from artsim.console import say, table
from artsim.errors import ArtsimError, ConfigError
from artsim.train.data import TrainingData, prepare_training_data
from artsim.train.models import head_description, split_state
from artsim.storage import join

def _fingerprint(cfg: TrainConfig, head: dict, spec_dict: dict) -> str:
    """What must match for a checkpoint to be resumable (not epochs, workers or learning rate)."""
    key = json.dumps({"mode": cfg.mode, "head": head, "backbone": spec_dict.get("backbone")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_resumable(storage, model_uri: str, fingerprint: str, name: str) -> None:
    """Ray Train resumes a run from the newest ``checkpoint_*`` under models/<name>/. One made with other settings
    (mode, head, backbone) cannot be resumed: say so here, before any worker starts. (The workers check it too, but
    there it is a worker failure that Ray Train restarts train.max_failures times before giving up.)"""
    from artsim.train.ray_train import CHECKPOINT_STATE

    for entry in reversed([n for n in storage.list(model_uri) if n.startswith("checkpoint_")]):
        state_uri = join(model_uri, entry, CHECKPOINT_STATE)
        if not storage.exists(state_uri):
            continue  # a checkpoint being written when a run was killed: Ray Train does not resume from it either
        found = json.loads(storage.read_text(state_uri)).get("fingerprint")
        if found != fingerprint:
            raise ConfigError("train.name", f"the checkpoints of run {name!r} in {model_uri} were trained with other "
                              f"settings (mode, head or backbone: {found} vs {fingerprint}); choose another "
                              f"train.name or delete {model_uri}")
        return


def _read_triplets(ctx) -> dict:
    uri = ctx.paths.triplets
    tab = ctx.storage.read_table(uri, columns=["anchor_id", "positive_id", "negative_id", "reason"])
    if tab.num_rows == 0:
        raise ArtsimError(f"{uri}: no triplets; run the mine stage on a collection with related works")
    return {name: tab.column(name).to_pylist() for name in tab.column_names}


def read_creators(ctx, needed: set) -> dict:
    """object_id -> normalised creator (unknown creators left out) for the objects ``needed`` names, streamed from
    records/: the validation split holds out whole creators (artsim.train.data)."""
    import pyarrow.compute as pc

    from artsim.rundir.names import normalise_creator
    from artsim.rundir.sample import stream_batches

    wanted = pa.array(sorted(needed), pa.string())
    creators = {}
    if not ctx.storage.exists(ctx.paths.records):  # no metadata: each work is its own group
        return creators
    for _, batch in stream_batches(ctx.storage, ctx.storage.dataset_files(ctx.paths.records),
                                   ["object_id", "creator"]):
        if "creator" not in batch.schema.names:
            continue
        batch = batch.filter(pc.fill_null(pc.is_in(batch.column(batch.schema.names.index("object_id")),
                                                   value_set=wanted), False))
        for row in batch.to_pylist():
            creator = normalise_creator(row.get("creator"))
            if creator:
                creators[row["object_id"]] = creator
    return creators


def load_head_inputs(ctx, cfg: TrainConfig, triplets: dict):
    """(embedder spec, features by object for TrainingData, data) for head mode."""
    from artsim.models.embedder import build_embedder
    from artsim.rundir.names import embeddings_key
    from artsim.rundir.embeddings import load_embedding_matrix

    embedder = build_embedder(ctx.config.embed, ctx.storage)
    if embedder.head is not None:
        raise ConfigError("embed.weights", "train.mode=head trains a head over backbone embeddings, but this "
                                           "artifact already has a head; set embed.weights to the backbone's "
                                           "weights (or null) or use train.mode=finetune")
    uri = ctx.paths.embeddings(embeddings_key(ctx, cfg.embeddings, "train.embeddings"))
    # Only the objects the triplets name (at most mine.max_objects and the curators' annotations), streamed: the
    # driver never holds the embeddings of the whole collection.
    needed = set(triplets["anchor_id"]) | set(triplets["positive_id"]) | set(triplets["negative_id"])
    ids, matrix = load_embedding_matrix(ctx.storage, uri, keep=needed)
    if not ids:
        raise ArtsimError(f"{uri}: none of the {len(needed)} objects the triplets name has an embedding there")
    if matrix.shape[1] != embedder.spec.feature_dim:
        raise ArtsimError(f"{uri}: embeddings have {matrix.shape[1]} dimensions but {embedder.spec.backbone} "
                          f"gives {embedder.spec.feature_dim}; they come from another model")
    data = prepare_training_data(triplets["anchor_id"], triplets["positive_id"], triplets["negative_id"],
                                 triplets["reason"], set(ids), cfg.validation_fraction, cfg.seed,
                                 groups=read_creators(ctx, needed))
    row = {oid: i for i, oid in enumerate(ids)}
    features = matrix[[row[o] for o in data.object_ids]]
    return embedder.spec, data, {"data": data, "features": features}, uri


def _read_images(storage, images_uri: str, needed: set) -> dict:
    """object_id -> image bytes of the ``ok`` rows of images/ that ``needed`` names, streamed in small batches: the
    driver holds the images training uses, never the whole images/ of the collection."""
    import pyarrow.compute as pc

    from artsim.rundir.sample import stream_batches

    wanted = pa.array(sorted(needed), pa.string())
    images = {}
    for _, batch in stream_batches(storage, storage.dataset_files(images_uri), ["object_id", "status", "image"],
                                   batch_rows=256):
        names = batch.schema.names
        mask = pc.and_(pc.equal(batch.column(names.index("status")), "ok"),
                       pc.is_in(batch.column(names.index("object_id")), value_set=wanted))
        for row in batch.filter(pc.fill_null(mask, False)).to_pylist():
            if row["image"] and row["object_id"] not in images:
                images[row["object_id"]] = row["image"]
    return images


def load_finetune_inputs(ctx, cfg: TrainConfig, triplets: dict):
    from artsim.models.embedder import build_embedder

    embedder = build_embedder(ctx.config.embed, ctx.storage)
    needed = set(triplets["anchor_id"]) | set(triplets["positive_id"]) | set(triplets["negative_id"])
    images = _read_images(ctx.storage, ctx.paths.images, needed)
    creators = read_creators(ctx, needed)
    data = prepare_training_data(triplets["anchor_id"], triplets["positive_id"], triplets["negative_id"],
                                 triplets["reason"], set(images), cfg.validation_fraction, cfg.seed, groups=creators)
    # Bad image bytes must not kill a worker: check that each decodes here (a status, not a crash).
    from artsim.models.preprocess import ImageDecodeError, decode_rgb

    bad = []
    for oid in data.object_ids:
        try:
            decode_rgb(images[oid], embedder.spec.resize_size)
        except ImageDecodeError as exc:
            bad.append((oid, str(exc)))
    if bad:
        say(f"train: {len(bad)} images do not decode and are left out (e.g. {bad[0][0]}: {bad[0][1]})")
        ok = set(data.object_ids) - {b[0] for b in bad}
        data = prepare_training_data(triplets["anchor_id"], triplets["positive_id"], triplets["negative_id"],
                                     triplets["reason"], ok, cfg.validation_fraction, cfg.seed, groups=creators)
    from artsim.train.data import PackedImages

    packed = PackedImages.pack([images[o] for o in data.object_ids])
    return embedder.spec, data, {"data": data, "images": packed}, ctx.paths.images


def plot_history(history: list, k: int, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    recall = [h.get(f"val_recall@{k}", np.nan) for h in history]
    ax1.plot(epochs, recall, marker="o", label=f"validation recall@{k}")
    acc = [h.get("val_triplet_accuracy", np.nan) for h in history]
    ax1.plot(epochs, acc, marker="s", label="validation triplet accuracy")
    ax1.set_xlabel("epoch (0 = untrained)")
    ax1.set_ylim(0, 1.02)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot([h["epoch"] for h in history if "train_loss" in h], [h["train_loss"] for h in history
                                                                  if "train_loss" in h], marker="o", label="train")
    ax2.plot(epochs, [h.get("val_loss", np.nan) for h in history], marker="s", label="validation")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("triplet loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run_train(ctx, **_options) -> dict:
    import ray

    from artsim.models.artifact import save_artifact
    from artsim.train import ray_train

    cfg: TrainConfig = ctx.config.train
    started = time.perf_counter()
    triplets = _read_triplets(ctx)
    loader = load_head_inputs if cfg.mode == "head" else load_finetune_inputs
    spec, data, payload, source = loader(ctx, cfg, triplets)
    data: TrainingData
    if cfg.mode == "head":
        in_dim = spec.feature_dim
    else:
        in_dim = spec.feature_dim if spec.head is None else spec.head["in_dim"]
    head = spec.head if (cfg.mode == "finetune" and spec.head is not None) else \
        head_description(in_dim, cfg.head_dim, cfg.head_hidden_dims,
                         center=cfg.mode == "head" and cfg.center_features and cfg.head_type == "projection",
                         head_type=cfg.head_type)
    say(f"train: mode {cfg.mode}, {data.stats['train_triplets']} training / {data.stats['validation_triplets']} "
        f"validation triplets over {data.n_objects} objects ({data.stats['unavailable']} triplets lack "
        f"{'embeddings' if cfg.mode == 'head' else 'images'}; inputs from {source})")
    if len(data.anchors) < cfg.num_workers:
        raise ArtsimError(f"train: {len(data.anchors)} training triplets cannot feed {cfg.num_workers} workers")
    from artsim.runtime import fit_task

    # each Ray Train worker is one task on one node: fail now, not after Ray waits forever for a node that fits
    fit_task(want_cpus=cfg.cpus_per_worker, min_cpus=cfg.cpus_per_worker, gpus=1 if cfg.use_gpu else 0,
             what="a Ray Train worker", key="train.use_gpu" if cfg.use_gpu else "train.cpus_per_worker")
    models_uri = join(ctx.paths.root, "models")
    model_uri = ctx.paths.model(cfg.name)
    loop_config = {
        "name": cfg.name, "mode": cfg.mode, "head": head, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "backbone_learning_rate": cfg.backbone_learning_rate if cfg.backbone_learning_rate is not None
        else cfg.learning_rate / 10,
        "steps_per_epoch": cfg.steps_per_epoch, "margin": cfg.margin, "mining": cfg.mining, "seed": cfg.seed, "recall_k": cfg.recall_k,
        "select_by": cfg.select_by, "preserve_neighbourhoods": cfg.preserve_neighbourhoods,
        "threads": cfg.cpus_per_worker, "fingerprint": _fingerprint(cfg, head, spec.to_dict()),
        "embed": dataclasses.asdict(ctx.config.embed), "storage": dataclasses.asdict(ctx.config.storage),
        "payload": ray.put(payload),
    }
    check_resumable(ctx.storage, model_uri, loop_config["fingerprint"], cfg.name)
    say(f"train: {cfg.num_workers} workers ({'GPU, nccl' if cfg.use_gpu else 'CPU, gloo'}), {cfg.epochs} epochs, "
        f"checkpoints in {model_uri}")
    result = ray_train.fit(loop_config, cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker, cfg.name, models_uri,
                           ctx.storage, cfg.max_failures, cfg.keep_checkpoints)
    if result.error is not None:
        raise ArtsimError(f"train: training failed: {str(result.error).strip().splitlines()[-1][:500]}")
    latest = ray_train.latest_checkpoint_state(result)
    if latest is None:
        raise ArtsimError(f"train: the run {cfg.name!r} produced no checkpoint")
    last_state, state, best_state = latest
    history = state["history"]
    best_epoch = state.get("best_epoch")
    if best_state is None or best_epoch is None:  # a checkpoint from before best tracking: the last epoch
        best_state, best_epoch = last_state, state["epoch"]

    backbone_state, head_state = split_state(best_state)  # the best epoch is exported, not the last
    finetuned = cfg.mode == "finetune"
    # text_tower=None: a trained head leaves the space a CLIP text tower embeds into (text queries are refused)
    export_spec = dataclasses.replace(spec, head=head, output_dim=int(head["out_dim"]),
                                      includes_backbone_weights=finetuned, text_tower=None)
    export_uri = ctx.paths.model_export(cfg.name)
    weights_id = save_artifact(ctx.storage, export_uri, export_spec,
                               backbone_state=backbone_state if finetuned else None, head_state=head_state)
    projected = None
    if cfg.mode == "head" and cfg.project_embeddings:
        projected = write_projected_embeddings(ctx, export_uri, source)
    k = cfg.recall_k
    by_epoch = {h["epoch"]: h for h in history}
    start, best, last = by_epoch[0], by_epoch.get(best_epoch, history[-1]), history[-1]
    before, after = start.get(f"val_recall@{k}"), best.get(f"val_recall@{k}")
    trained_epochs = [h for h in history if h["epoch"] > 0]
    epoch_seconds = float(np.mean([h["epoch_seconds"] for h in trained_epochs])) if trained_epochs else None
    start_is_model = head["type"] == "residual"  # identity at start: epoch 0 is the backbone's own embedding

    def scores(h: dict) -> dict:
        return {"epoch": h["epoch"], "val_score": h.get("val_score"), f"val_recall@{k}": h.get(f"val_recall@{k}"),
                f"val_creator_recall@{k}": h.get(f"val_creator_recall@{k}"), "val_loss": h.get("val_loss")}

    if best_epoch == 0:
        verdict = ("no epoch beat the start on held-out creators: the export is the start" +
                   (" (the pretrained model unchanged)" if start_is_model else " (the untrained head)"))
    elif start.get("val_score") is None:
        verdict = f"no validation set (too few creators?): exported the last epoch ({best_epoch})"
    else:
        verdict = f"exported epoch {best_epoch}, the best on held-out creators"
    summary = {
        "mode": cfg.mode, "head": head["type"], "epochs": state["epoch"], "sessions": state["sessions"],
        "restarts": len(state["sessions"]) - 1, "data": data.stats,
        f"val_recall@{k}_untrained": before, f"val_recall@{k}": after,
        "validation": {"start": scores(start), "best": scores(best), "last": scores(last),
                       "split": data.stats.get("split"), "start_is_pretrained": start_is_model},
        "best_epoch": best_epoch, "exported_epoch": best_epoch, "export_is_start": best_epoch == 0,
        "verdict": verdict,
        "epoch_seconds_mean": epoch_seconds, "export": export_uri, "weights_id": weights_id,
        "projected_embeddings": projected, "history": history,
    }
    ctx.storage.write_json(join(model_uri, "history.json"), summary)
    ctx.storage.write_bytes(join(model_uri, "recall.png"),
                            plot_history(history, k, f"{cfg.name}: {cfg.mode} mode, {cfg.mining} mining"))
    table(["epoch", "train loss", "val loss", f"val recall@{k}", f"val same-creator@{k}", "val score",
           "val triplet acc", "seconds", ""],
          [(h["epoch"], _fmt(h.get("train_loss")), _fmt(h.get("val_loss")), _fmt(h.get(f"val_recall@{k}")),
            _fmt(h.get(f"val_creator_recall@{k}")), _fmt(h.get("val_score")), _fmt(h.get("val_triplet_accuracy")),
            _fmt(h.get("epoch_seconds"), 1), "exported" if h["epoch"] == best_epoch else "") for h in history])
    say(f"train: validation on {data.stats.get('held_out_groups')} held-out "
        f"{'creators/anonymous works' if data.stats.get('split') == 'creator' else 'objects'}: score start "
        f"{_fmt(start.get('val_score'))}, best {_fmt(best.get('val_score'))} (epoch {best_epoch}), last "
        f"{_fmt(last.get('val_score'))} (epoch {last['epoch']}); {verdict}")
    if summary["restarts"]:
        say(f"train: resumed {summary['restarts']} time(s) from a checkpoint (sessions started at epochs "
            f"{[s['start_epoch'] for s in state['sessions']]})")
    say(f"train: done in {time.perf_counter() - started:.1f} s; validation recall@{k} {_fmt(before)} at start -> "
        f"{_fmt(after)} exported (epoch {best_epoch}); exported to {export_uri} (use embed.weights: {export_uri}, embed.model: {spec.backbone}); "
        f"plot {join(model_uri, 'recall.png')}")
    return {k_: v for k_, v in summary.items() if k_ != "history"}


def write_projected_embeddings(ctx, export_uri: str, source_uri: str, batch_rows: int = 65_536) -> str:
    """Head mode: apply the exported head to every cached backbone embedding of the collection and write them as
    embeddings/<model_key>/ for ``embed.weights: <export>`` -- the same vectors the embed stage would compute
    with that artifact (the head is bias-free, so it commutes with the L2 normalisation of the cached vectors),
    at the cost of a matrix product instead of a second pass of the backbone over every image."""
    import torch

    from artsim.models.artifact import load_artifact
    from artsim.models.embedder import model_description
    from artsim.models.heads import build_head
    from artsim.rundir.names import model_key
    from artsim.rundir.embeddings import EmbeddingWriter, iter_embedding_batches

    embed_cfg = dataclasses.replace(ctx.config.embed, weights=export_uri)
    spec, _, head_state, weights_id = load_artifact(ctx.storage, export_uri)
    head = build_head(spec.head)
    head.load_state_dict(head_state, strict=True)
    head.eval()
    key = model_key(embed_cfg)
    out_uri = ctx.paths.embeddings(key)
    with ctx.storage.atomic_dir(out_uri) as staging:
        writer = EmbeddingWriter(ctx.storage, staging, key, spec.output_dim, embed_cfg.dtype)
        with torch.no_grad():  # streamed batch by batch: memory is one batch whatever the collection size
            for part, matrix in iter_embedding_batches(ctx.storage, source_uri, batch_rows=batch_rows):
                vectors = head(torch.from_numpy(np.ascontiguousarray(matrix)))
                vectors = torch.nn.functional.normalize(vectors, dim=1).numpy()
                writer.add(part, vectors, [None] * len(part))
        writer.close()
        ctx.storage.write_json(join(staging, "_model.json"),
                               model_description(key, spec, weights_id, export_uri, embed_cfg.seed)
                               | {"dtype": embed_cfg.dtype, "precision": "fp32", "projected_from": source_uri})
    say(f"train: projected {writer.written} cached embeddings through the head -> {out_uri} "
        f"(index them with index.embeddings: {key})")
    return out_uri


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}"
