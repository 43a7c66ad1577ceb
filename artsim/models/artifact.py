"""The model artifact format, and the one way to build an embedding model from `embed.model` / `embed.weights`.

Embed, train and serving all go through this module so that they always agree on backbone, weights,
preprocessing and output dimension.

An artifact is a directory (local path, file:// or s3://)::

    weights.safetensors   tensors named "backbone.<key>" and/or "head.<key>" (safetensors: no pickle, ever)
    artifact.json         {"format": "artsim-model/1", "spec": {ModelSpec}, "weights_sha256": ...}

`artifact.json` is written last, so a directory without it is an unfinished export and is refused. Loading checks
the weights file against `weights_sha256` before parsing it. The sha256 is the artifact's `weights_id`.

How the train stage uses it::

    embedder = build_embedder(cfg.embed, storage)            # the backbone the embeddings came from
    head = build_head({"type": "linear", "in_dim": embedder.spec.feature_dim, "out_dim": 256})
    ... train head on embeddings (head mode) or head + embedder.backbone (finetune mode) ...
    spec = dataclasses.replace(embedder.spec, head=head_dict, output_dim=256,
                               includes_backbone_weights=finetuned)
    save_artifact(storage, paths.model_export(name), spec,
                  backbone_state=embedder.backbone.state_dict() if finetuned else None,
                  head_state=head.state_dict())

`embed.weights: <that URI>` then embeds with backbone + head; `embed.model` must name the same backbone.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional

from artsim.errors import ArtsimError, IntegrityError
from artsim.models.heads import build_head
from artsim.models.spec import ModelSpec
from artsim.storage import Storage, join


ARTIFACT_FORMAT = "artsim-model/1"
SPEC_FILE = "artifact.json"
WEIGHTS_FILE = "weights.safetensors"


def _safe_state(state: dict, prefix: str) -> dict:
    import torch

    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ArtsimError(f"{prefix}{key}: state dict values must be tensors")
        # clone: safetensors refuses tensors that share memory; contiguous: it stores raw buffers
        out[f"{prefix}{key}"] = value.detach().to("cpu").contiguous().clone()
    return out


def save_artifact(storage: Storage, uri: str, spec: ModelSpec, backbone_state: Optional[dict] = None,
                  head_state: Optional[dict] = None, text_state: Optional[dict] = None) -> str:
    """Write an artifact directory at ``uri``; returns its weights_id (sha256 of weights.safetensors).

    artifact.json is removed first and written last, so readers never take a half-written export for a finished one.
    """
    from safetensors.torch import save as safetensors_save

    spec = ModelSpec.from_dict(spec.to_dict(), "spec")  # same checks as on load: never write what cannot be read
    if spec.includes_backbone_weights != (backbone_state is not None):
        raise ArtsimError("save_artifact: pass backbone_state exactly when spec.includes_backbone_weights is true")
    if (spec.head is not None) != (head_state is not None):
        raise ArtsimError("save_artifact: pass head_state exactly when spec.head is set")
    if (spec.text_tower is not None) != (text_state is not None):
        raise ArtsimError("save_artifact: pass text_state exactly when spec.text_tower is set")
    if backbone_state is None and head_state is None:
        raise ArtsimError("save_artifact: nothing to save (no backbone weights and no head)")
    if head_state is not None:  # fail now, not when someone loads it
        try:
            build_head(spec.head).load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            raise ArtsimError(f"save_artifact: head_state does not match spec.head: {exc}") from None
    tensors = {}
    tensors.update(_safe_state(backbone_state or {}, "backbone."))
    tensors.update(_safe_state(head_state or {}, "head."))
    tensors.update(_safe_state(text_state or {}, "text."))
    data = safetensors_save(tensors, metadata={"format": ARTIFACT_FORMAT})
    weights_id = hashlib.sha256(data).hexdigest()
    spec_uri = join(uri, SPEC_FILE)
    if storage.exists(spec_uri):
        storage.delete(spec_uri)
    storage.write_bytes(join(uri, WEIGHTS_FILE), data)
    storage.write_json(spec_uri, {"format": ARTIFACT_FORMAT, "spec": spec.to_dict(), "weights_file": WEIGHTS_FILE,
                                  "weights_sha256": weights_id, "weights_bytes": len(data)})
    return weights_id


def load_artifact(storage: Storage, uri: str) -> tuple[ModelSpec, Optional[dict], Optional[dict], str]:
    """Read and verify an artifact: (spec, backbone_state or None, head_state or None, weights_id)."""
    spec, backbone, head, _, weights_id = load_artifact_parts(storage, uri)
    return spec, backbone, head, weights_id


def load_artifact_parts(storage: Storage, uri: str
                        ) -> tuple[ModelSpec, Optional[dict], Optional[dict], Optional[dict], str]:
    """load_artifact, plus a CLIP artifact's text tower: (spec, backbone, head, text_state or None, weights_id)."""
    from safetensors.torch import load as safetensors_load

    spec_uri = join(uri, SPEC_FILE)
    if not storage.exists(spec_uri):
        hint = " (an unfinished export?)" if storage.exists(join(uri, WEIGHTS_FILE)) else ""
        raise ArtsimError(f"{uri}: not a model artifact: {SPEC_FILE} not found{hint}")
    meta = storage.read_json(spec_uri)
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtsimError(f"{spec_uri}: unsupported artifact format {found!r} (expected {ARTIFACT_FORMAT})")
    spec = ModelSpec.from_dict(meta.get("spec"), f"{spec_uri}: spec")
    expected = meta.get("weights_sha256")
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ArtsimError(f"{spec_uri}: weights_sha256 missing or malformed")
    weights_uri = join(uri, WEIGHTS_FILE)  # fixed name: never a path taken from the file
    data = storage.read_bytes(weights_uri)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise IntegrityError(f"{weights_uri}: sha256 {actual[:12]}... does not match artifact.json "
                             f"({expected[:12]}...); the file is corrupt or was tampered with")
    try:
        tensors = safetensors_load(data)
    except Exception as exc:
        raise ArtsimError(f"{weights_uri}: not a valid safetensors file: {exc}") from None
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    text = {k[len("text."):]: v for k, v in tensors.items() if k.startswith("text.")}
    known = ("backbone.", "head.", "text.") if spec.text_tower is not None else ("backbone.", "head.")
    stray = [k for k in tensors if not k.startswith(known)]
    if stray:
        raise ArtsimError(f"{weights_uri}: unexpected tensors {stray[:5]}")
    if spec.includes_backbone_weights and not backbone:
        raise ArtsimError(f"{weights_uri}: spec says it includes backbone weights but there are none")
    if spec.head is not None and not head:
        raise ArtsimError(f"{weights_uri}: spec has a head but there are no head weights")
    if spec.text_tower is not None and not text:
        raise ArtsimError(f"{weights_uri}: spec has a text tower but there are no text weights")
    return (spec, (backbone if spec.includes_backbone_weights else None), (head if spec.head else None),
            (text if spec.text_tower is not None else None), actual)
