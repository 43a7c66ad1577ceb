"""The thin Ray Train layer: one training loop per worker (DDP over gloo on CPU / nccl on GPU), checkpoints every
epoch to run storage, restart from the last checkpoint after a worker failure, resume on resubmission.

Checkpoint directory (nothing in it is pickled):
    model.safetensors   the trainable module's state ("head.*", and "backbone.*" in finetune mode)
    optimizer.pt        the optimizer state, read back with torch.load(weights_only=True)
    best.safetensors    the state of the best epoch so far by validation score (epoch 0, the start, included)
    state.json          {"epoch", "history" (metrics per epoch, epoch 0 = untrained), "sessions", "fingerprint",
                         "best_epoch"}

Everything the loop needs arrives in ``config``: plain values, plus an ObjectRef to the prepared TrainingData and
its features or image bytes (put in the object store once by the driver, shared zero-copy by workers on a node).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from artsim.console import say
from artsim.train.selection import is_new_best, validation_score, worse_than_start  # noqa: F401 (re-exported)

CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_BEST = "best.safetensors"


def read_checkpoint_dir(path: str) -> tuple[dict, dict]:
    """(model state dict, state.json) of a checkpoint directory."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CHECKPOINT_STATE), encoding="utf-8") as f:
        state = json.load(f)
    return load_file(os.path.join(path, CHECKPOINT_MODEL)), state


def read_best_state(path: str) -> Optional[dict]:
    from safetensors.torch import load_file

    best = os.path.join(path, CHECKPOINT_BEST)
    return load_file(best) if os.path.exists(best) else None


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _write_checkpoint_dir(path: str, model, optimizer, state: dict, best_state: Optional[dict] = None) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(_cpu_state(model), os.path.join(path, CHECKPOINT_MODEL))
    if best_state is not None:
        save_file(best_state, os.path.join(path, CHECKPOINT_BEST))
    torch.save(optimizer.state_dict(), os.path.join(path, CHECKPOINT_OPTIMIZER))
    with open(os.path.join(path, CHECKPOINT_STATE), "w", encoding="utf-8") as f:
        json.dump(state, f)


def _build_model(config: dict, payload: dict):
    """(model, encode) where encode(object indices, training) -> unit vectors (torch) for those objects."""
    import torch

    from artsim.train.models import FinetuneModel, HeadModel

    torch.manual_seed(config["seed"])  # every rank starts from the same weights (DDP also broadcasts them)
    if config["mode"] == "head":
        model = HeadModel(config["head"])
        import warnings

        with warnings.catch_warnings():
            # The features are a read-only view of the object store (shared, not copied); nothing writes to them.
            warnings.simplefilter("ignore", UserWarning)
            features = torch.from_numpy(payload["features"])
        if config["head"].get("center"):
            # The mean of the (normalised) training features; a buffer, so checkpoints and the export carry it.
            model.head.mean.copy_(torch.nn.functional.normalize(features.float(), dim=1).mean(dim=0))

        def encode(objects: np.ndarray, training: bool, module=None, reference=None):
            x = features[torch.from_numpy(objects)]
            if reference is None:
                return (module or model)(x)
            with torch.no_grad():  # the frozen start model only: the trained one needs its graph
                start = reference(x)
            return (module or model)(x), start

        return model, encode

    from artsim.config import EmbedConfig, StorageConfig
    from artsim.models.embedder import build_embedder
    from artsim.models.heads import build_head
    from artsim.models.preprocess import normalize
    from artsim.storage import Storage

    embedder = build_embedder(EmbedConfig(**config["embed"]), Storage(StorageConfig(**config["storage"])))
    head = embedder.head if embedder.head is not None else build_head(config["head"])
    model = FinetuneModel(embedder.backbone, head)
    for p in model.parameters():
        p.requires_grad_(True)
    # Each batch's images are decoded when it comes up, with exactly the preprocessing the embed stage uses; the
    # compressed images are shared by the node's workers (PackedImages), so memory does not grow with decoded pixels.
    from concurrent.futures import ThreadPoolExecutor

    images = payload["images"]
    mean, std = embedder.spec.mean, embedder.spec.std
    decoder = ThreadPoolExecutor(max(1, config["threads"]), thread_name_prefix="artsim-decode")

    def pixels_of(objects: np.ndarray) -> np.ndarray:  # PIL decodes outside the GIL: threads overlap
        return np.stack(list(decoder.map(lambda i: embedder.preprocess_pixels(images[int(i)]), objects)))

    def encode(objects: np.ndarray, training: bool, module=None, reference=None):
        batch = torch.from_numpy(pixels_of(objects))
        if training:  # horizontal flips: a mirrored painting shows the same subject
            flip = torch.rand(len(objects)) < 0.5
            batch[flip] = batch[flip].flip(dims=[2])
        device = next((module or model).parameters()).device
        x = normalize(batch.to(device), mean, std)
        if reference is None:
            return (module or model)(x)
        with torch.no_grad():  # the frozen start model on exactly the same (flipped) pixels; not the trained one
            start = reference(x)
        return (module or model)(x), start

    return model, encode


def _evaluate(encode: Callable, module, data, k: int, margin: float) -> dict:
    import torch

    from artsim.train.evaluate import recall_at_k
    from artsim.train.losses import triplet_loss

    out: dict = {}
    module.eval()
    encoded: dict = {}

    def vectors_of(objects: np.ndarray) -> np.ndarray:  # the recalls share one gallery: encode it once
        key = (id(objects), len(objects))
        if key not in encoded:
            encoded[key] = torch.cat([encode(chunk, False, module) for chunk in np.array_split(
                objects, max(1, len(objects) // 256))]).cpu().numpy()
        return encoded[key]

    with torch.no_grad():
        if len(data.val_objects) >= 2:
            r = recall_at_k(vectors_of(data.val_objects), data.val_relevance, k)
            out[f"val_recall@{k}"] = r["recall"]
            out["val_queries"] = r["queries"]
        creator_objects = getattr(data, "val_creator_objects", np.zeros(0, np.int64))
        if len(creator_objects) >= 2:
            r = recall_at_k(vectors_of(creator_objects), data.val_creator_relevance, k)
            out[f"val_creator_recall@{k}"] = r["recall"]
            out["val_creator_queries"] = r["queries"]
        for kind, (objects, relevance) in getattr(data, "val_criteria", {}).items():
            if len(objects) >= 2:  # each kind of criterion on its own: a gain in one must not hide a loss in another
                r = recall_at_k(vectors_of(objects), relevance, k)
                if r["queries"]:
                    out[f"val_recall@{k}[{kind}]"] = r["recall"]
        if len(data.val_anchors):
            objs, inv = np.unique(np.concatenate([data.val_anchors, data.val_positives, data.val_negatives]),
                                  return_inverse=True)
            emb = torch.cat([encode(chunk, False, module) for chunk in np.array_split(objs, max(1, len(objs) // 256))])
            m = len(data.val_anchors)
            ai, pi, ni = (torch.from_numpy(inv[i * m:(i + 1) * m]) for i in range(3))
            loss, st = triplet_loss(emb, ai, pi, ni, margin)
            out["val_loss"] = float(loss)
            d_ap = 1 - (emb[ai] * emb[pi]).sum(1)
            d_an = 1 - (emb[ai] * emb[ni]).sum(1)
            out["val_triplet_accuracy"] = float((d_ap < d_an).float().mean())
    return out


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from artsim.train.data import epoch_batches
    from artsim.train.losses import neighbourhood_loss, positive_pair_keys, triplet_loss, valid_negative_mask

    torch.set_num_threads(max(1, int(config["threads"])))
    payload = ray.get(config["payload"])
    data = payload["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    raw_model, encode = _build_model(config, payload)
    preserve = float(config.get("preserve_neighbourhoods") or 0.0)
    reference = None
    if preserve > 0:  # the start model, frozen (built before any checkpoint is loaded: the pretrained start)
        import copy

        reference = copy.deepcopy(raw_model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)

    start_epoch, history, sessions = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    optimizer_state = None
    if checkpoint:
        with checkpoint.as_directory() as path:
            state_dict, state = read_checkpoint_dir(path)
            if state.get("fingerprint") != config["fingerprint"]:
                raise ValueError(f"the checkpoint of run {config['name']!r} was trained with other settings "
                                 f"({state.get('fingerprint')} vs {config['fingerprint']}); choose another "
                                 "train.name or delete models/<name>/")
            raw_model.load_state_dict(state_dict, strict=True)
            optimizer_state = torch.load(os.path.join(path, CHECKPOINT_OPTIMIZER), weights_only=True)
            best_state = read_best_state(path)
        start_epoch, history, sessions = int(state["epoch"]), state["history"], state["sessions"]
        best_epoch = state.get("best_epoch")
    else:
        best_state, best_epoch = None, None
    sessions = sessions + [{"start_epoch": start_epoch + 1, "world_size": world, "time": time.time()}]

    model = ray.train.torch.prepare_model(raw_model)  # DDP when world > 1; moves to the worker's device
    module = model.module if hasattr(model, "module") else model  # for evaluation without DDP hooks
    if reference is not None:  # on the workers' device once, not per batch
        reference = reference.to(next(module.parameters()).device)
    params = [{"params": [p for n, p in module.named_parameters() if not n.startswith("backbone.")],
               "lr": config["learning_rate"]}]
    backbone_params = [p for n, p in module.named_parameters() if n.startswith("backbone.")]
    if backbone_params:
        params.append({"params": backbone_params, "lr": config["backbone_learning_rate"]})
    optimizer = torch.optim.Adam(params)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    k, margin, mining = config["recall_k"], config["margin"], config["mining"]
    select_by = config.get("select_by", "every_metric")
    pair_keys = positive_pair_keys(data.anchors, data.positives, data.n_objects) if mining != "none" else None
    if not history and rank == 0:
        history.append({"epoch": 0, **_evaluate(encode, module, data, k, margin)})  # the untrained model
        history[0]["val_score"] = validation_score(history[0], k, select_by)
        best_state, best_epoch = _cpu_state(module), 0  # the start is the model to beat
    best_score = next((h.get("val_score") for h in history if h["epoch"] == best_epoch), None)

    for epoch in range(start_epoch + 1, config["epochs"] + 1):
        started = time.perf_counter()
        model.train()
        batches = epoch_batches(len(data.anchors), config["batch_size"], epoch, config["seed"], rank, world)
        if config.get("steps_per_epoch"):
            batches = batches[:config["steps_per_epoch"]]  # a fresh permutation each epoch: other triplets next time
        total_loss, total_active, seen = 0.0, 0.0, 0
        for step, batch in enumerate(batches):
            a, p, n = data.anchors[batch], data.positives[batch], data.negatives[batch]
            objects, inverse = np.unique(np.concatenate([a, p, n]), return_inverse=True)
            m = len(batch)
            ai, pi, ni = (torch.from_numpy(inverse[i * m:(i + 1) * m]) for i in range(3))
            if reference is not None:
                emb, start_emb = encode(objects, True, model, reference)
            else:
                emb = encode(objects, True, model)
            valid = None
            if mining != "none":
                valid = torch.from_numpy(valid_negative_mask(a, p, objects, pair_keys, data.n_objects))
            loss, stats = triplet_loss(emb, ai.to(emb.device), pi.to(emb.device), ni.to(emb.device), margin,
                                       mining, valid.to(emb.device) if valid is not None else None)
            if reference is not None:
                loss = loss + preserve * neighbourhood_loss(emb, start_emb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * m
            total_active += stats["active"] * m
            seen += m
        sums = torch.tensor([total_loss, total_active, float(seen)], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "train_loss": float(sums[0] / max(sums[2], 1)),
                   "train_active": float(sums[1] / max(sums[2], 1)), "train_triplets": int(sums[2]),
                   "epoch_seconds": seconds, "triplets_per_second": float(sums[2]) / max(seconds, 1e-9)}
        if rank == 0:
            metrics.update(_evaluate(encode, module, data, k, margin))
            score = metrics["val_score"] = validation_score(metrics, k, select_by)
            start = next((h for h in history if h["epoch"] == 0), None)
            metrics["val_worse_than_start"] = worse_than_start(metrics, start, k, select_by) if start else []
            # Strictly better only, and (select_by: every_metric) no validation metric below the start's: on a tie
            # the earlier epoch (ultimately the start) stays the best (artsim.train.selection). Without any
            # validation set there is nothing to choose by, and the last epoch is kept.
            if is_new_best(metrics, start, best_score, k, select_by):
                best_state, best_epoch, best_score = _cpu_state(module), epoch, score
            history.append(metrics)
            recall, creator = metrics.get(f"val_recall@{k}"), metrics.get(f"val_creator_recall@{k}")
            say(f"train: epoch {epoch}/{config['epochs']} loss {metrics['train_loss']:.4f} "
                f"val recall@{k} {_round(recall)} same-creator {_round(creator)} score {_round(score)}"
                f"{' (below the start: ' + ', '.join(metrics['val_worse_than_start']) + ')' if metrics['val_worse_than_start'] else ''} "
                f"(best: epoch {best_epoch}; {seconds:.1f} s, {metrics['triplets_per_second']:.0f} triplets/s)")
            with tempfile.TemporaryDirectory() as tmp:
                _write_checkpoint_dir(tmp, module, optimizer, {
                    "epoch": epoch, "history": history, "sessions": sessions, "fingerprint": config["fingerprint"],
                    "best_epoch": best_epoch}, best_state)
                ray.train.report(_scalar(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(_scalar(metrics))


def _round(value) -> Optional[float]:
    return None if value is None or value != value else round(value, 4)


def _scalar(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}


def fit(loop_config: dict, num_workers: int, use_gpu: bool, cpus_per_worker: int, name: str, storage_uri: str,
        storage, max_failures: int, keep_checkpoints: int):
    """Run the TorchTrainer; returns ray.train.Result. storage_uri: the directory that holds models/<name>/."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.arrow_fs(storage_uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    try:
        return trainer.fit()
    except Exception as exc:  # Ray Train raises TrainingFailedError / ControllerError once retries are spent
        from artsim.errors import ArtsimError

        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise ArtsimError(f"train: training failed after {max_failures} restart(s) allowed: "
                          f"{type(exc).__name__}: {(lines[-1] if lines else '')[:400]}") from exc


def latest_checkpoint_state(result) -> Optional[tuple[dict, dict, Optional[dict]]]:
    """(last state dict, state.json, best state dict or None for checkpoints written before best tracking)."""
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as path:
        return (*read_checkpoint_dir(path), read_best_state(path))
