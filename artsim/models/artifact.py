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

import contextlib
import dataclasses
import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch.nn as nn

from artsim.models import efficientnet_lite as _lite
from artsim.errors import ArtsimError, ConfigError, IntegrityError
from artsim.rundir.names import is_artifact_uri, model_key
from artsim.storage import Storage, join

ARTIFACT_FORMAT = "artsim-model/1"
SPEC_FILE = "artifact.json"
WEIGHTS_FILE = "weights.safetensors"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_IMAGE_SIZE = 224
# Fetching torchvision weights must fail fast on machines without internet, never hang.
DOWNLOAD_TIMEOUT_S = 20.0
# Attributes torchvision classifiers keep their classification head in (resnet/regnet/inception: fc, vit: heads,
# swin: head, convnext/efficientnet/mobilenet/densenet/vgg/maxvit: classifier).
HEAD_ATTRIBUTES = ("fc", "heads", "head", "classifier")


@dataclass
class ModelSpec:
    """Everything needed to rebuild an embedding model; what artifact.json holds under "spec"."""

    backbone: str  # torchvision model name (torchvision.models.get_model)
    backbone_weights: Optional[str]  # torchvision weights name the backbone starts from (e.g. IMAGENET1K_V2), if any
    image_size: int  # side of the square crop fed to the model
    mean: list[float]
    std: list[float]
    feature_dim: int  # pooled backbone feature size
    head: Optional[dict]  # projection head (see build_head) or None
    output_dim: int  # embedding size (feature_dim without a head)
    includes_backbone_weights: bool  # the artifact's weights file carries the backbone (finetuned)
    resize_size: Optional[int] = None  # shorter side before the centre crop; None = image_size
    backbone_seed: Optional[int] = None  # random-init seed when there are neither backbone weights nor a name

    def __post_init__(self):
        if self.resize_size is None:
            self.resize_size = self.image_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "spec") -> "ModelSpec":
        """Validate an untrusted dict (artifact.json) field by field; ArtsimError names the bad field."""
        if not isinstance(data, dict):
            raise ArtsimError(f"{where}: expected a mapping")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ArtsimError(f"{where}: unknown fields {sorted(unknown)}")
        required = [n for n, f in known.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for name in required:
            if name not in data:
                raise ArtsimError(f"{where}.{name}: missing")

        def need(name, ok, what):
            if name in data and not ok(data[name]):
                raise ArtsimError(f"{where}.{name}: expected {what}, got {data[name]!r}")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        need("backbone", lambda v: isinstance(v, str) and v, "a torchvision model name")
        need("backbone_weights", lambda v: v is None or isinstance(v, str), "a string or null")
        for name in ("image_size", "feature_dim", "output_dim"):
            need(name, lambda v: is_int(v) and 1 <= v <= 1_000_000, "a positive integer")
        need("resize_size", lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null")
        need("backbone_seed", lambda v: v is None or is_int(v), "an integer or null")
        for name in ("mean", "std"):
            need(name, lambda v: isinstance(v, list) and len(v) == 3
                 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v), "three numbers")
        need("std", lambda v: all(x > 0 for x in v), "positive numbers")
        need("head", lambda v: v is None or isinstance(v, dict), "a mapping or null")
        need("includes_backbone_weights", lambda v: isinstance(v, bool), "true or false")
        spec = cls(**data)
        spec.mean = [float(x) for x in spec.mean]
        spec.std = [float(x) for x in spec.std]
        if spec.head is not None:
            build_head(spec.head)  # validates the head description
            if int(spec.head["in_dim"]) != spec.feature_dim or int(spec.head["out_dim"]) != spec.output_dim:
                raise ArtsimError(f"{where}.head: in_dim/out_dim must equal feature_dim/output_dim")
        elif spec.output_dim != spec.feature_dim:
            raise ArtsimError(f"{where}.output_dim: must equal feature_dim when there is no head")
        return spec


# ----------------------------------------------------------------------------------------------------------------
# Projection heads


class CenteredHead(nn.Module):
    """L2-normalise, subtract the collection's mean feature, then the layers. Backbones (random-init ones above all)
    give features with a large common component (pairwise cosine ~0.999 for a random-init resnet50); a head that
    starts from the centred features does not have to learn to cancel it. Normalising first keeps the head
    independent of input scale (the embed stage feeds raw features, training feeds normalised ones)."""

    def __init__(self, in_dim: int, layers: nn.Module):
        super().__init__()
        import torch

        self.register_buffer("mean", torch.zeros(in_dim))
        self.layers = layers

    def forward(self, x):
        return self.layers(nn.functional.normalize(x, dim=1) - self.mean)


class ResidualHead(nn.Module):
    """x + up(down(x)): a low-rank residual adapter whose ``up`` starts at zero, so an untrained head is exactly
    the identity and training starts from the backbone's own embedding (epoch 0 == the pretrained model). Linear
    and bias-free, so it commutes with L2 normalisation like the other heads."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return x + self.up(self.down(x))


def build_head(head: dict):
    """The projection head described by ``head`` (an nn.Module; state_dict keys are stable across versions).

    - ``{"type": "linear", "in_dim": 2048, "out_dim": 256}``
    - ``{"type": "mlp", "in_dim": 2048, "hidden_dims": [512], "out_dim": 256}`` (Linear-ReLU per hidden layer)
    - ``{"type": "residual", "in_dim": 1280, "rank": 64, "out_dim": 1280}`` (identity at init, see ResidualHead)
    Optional ``"bias": false`` (default true) and ``"center": true`` (see :class:`CenteredHead`; its ``mean``
    buffer is part of the state dict).
    """
    if not isinstance(head, dict):
        raise ArtsimError(f"head: expected a mapping, got {head!r}")
    kind = head.get("type")
    if kind == "residual":  # {"type": "residual", "in_dim": d, "rank": r, "out_dim": d} (see ResidualHead)
        unknown = set(head) - {"type", "in_dim", "rank", "out_dim"}
        if unknown:
            raise ArtsimError(f"head: unknown fields {sorted(unknown)} for type residual")
        dims = [head.get("in_dim"), head.get("rank"), head.get("out_dim")]
        if not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1_000_000 for d in dims):
            raise ArtsimError(f"head: dimensions must be positive integers, got {dims!r}")
        if head["out_dim"] != head["in_dim"]:
            raise ArtsimError("head: a residual head has out_dim == in_dim")
        return ResidualHead(head["in_dim"], head["rank"])
    allowed = {"linear": {"type", "in_dim", "out_dim", "bias", "center"},
               "mlp": {"type", "in_dim", "hidden_dims", "out_dim", "bias", "center"}}
    if kind not in allowed:
        raise ArtsimError(f"head.type: expected one of {sorted(allowed) + ['residual']}, got {kind!r}")
    unknown = set(head) - allowed[kind]
    if unknown:
        raise ArtsimError(f"head: unknown fields {sorted(unknown)} for type {kind}")
    dims = [head.get("in_dim")] + list(head.get("hidden_dims") or []) + [head.get("out_dim")]
    if kind == "mlp" and not isinstance(head.get("hidden_dims"), list):
        raise ArtsimError("head.hidden_dims: expected a list of integers")
    for d in dims:
        if not (isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1_000_000):
            raise ArtsimError(f"head: dimensions must be positive integers, got {d!r}")
    bias, center = head.get("bias", True), head.get("center", False)
    if not isinstance(bias, bool):
        raise ArtsimError("head.bias: expected true or false")
    if not isinstance(center, bool):
        raise ArtsimError("head.center: expected true or false")
    layers: list = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return CenteredHead(dims[0], nn.Sequential(*layers)) if center else nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading artifacts


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
                  head_state: Optional[dict] = None) -> str:
    """Write an artifact directory at ``uri``; returns its weights_id (sha256 of weights.safetensors).

    artifact.json is removed first and written last, so readers never take a half-written export for a finished one.
    """
    from safetensors.torch import save as safetensors_save

    spec = ModelSpec.from_dict(spec.to_dict(), "spec")  # same checks as on load: never write what cannot be read
    if spec.includes_backbone_weights != (backbone_state is not None):
        raise ArtsimError("save_artifact: pass backbone_state exactly when spec.includes_backbone_weights is true")
    if (spec.head is not None) != (head_state is not None):
        raise ArtsimError("save_artifact: pass head_state exactly when spec.head is set")
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
    stray = [k for k in tensors if not k.startswith(("backbone.", "head."))]
    if stray:
        raise ArtsimError(f"{weights_uri}: unexpected tensors {stray[:5]}")
    if spec.includes_backbone_weights and not backbone:
        raise ArtsimError(f"{weights_uri}: spec says it includes backbone weights but there are none")
    if spec.head is not None and not head:
        raise ArtsimError(f"{weights_uri}: spec has a head but there are no head weights")
    return spec, (backbone if spec.includes_backbone_weights else None), (head if spec.head else None), actual


# ----------------------------------------------------------------------------------------------------------------
# Backbones


def _check_model_name(name: str) -> None:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in names:
        close = [n for n in names if n.split("_")[0] == name.split("_")[0]][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError("embed.model", f"{name!r} is not a torchvision classification model{hint}")


def torchvision_weights(model: str, weights_name: str):
    """The torchvision weights enum entry for ``model`` (accepts "IMAGENET1K_V2" or "ResNet50_Weights.IMAGENET1K_V2")."""
    from torchvision.models import get_model_weights

    _check_model_name(model)
    enum = get_model_weights(model)
    short = weights_name.split(".", 1)[1] if weights_name.startswith(enum.__name__ + ".") else weights_name
    try:
        return enum[short]
    except KeyError:
        valid = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ConfigError("embed.weights", f"{weights_name!r} is not a weights name of {model} "
                                           f"(valid: {valid}), nor an artifact URI") from None


def strip_classifier(model) -> int:
    """Replace the classification layer by Identity, in place; returns the pooled feature size it received.

    Only the final Linear is removed, so pooling, norms and flattening that sit in the same container (convnext's
    LayerNorm2d+Flatten, maxvit's pool+norm, vit's class-token head) stay: the output is the pooled penultimate
    feature vector for every torchvision classification family.
    """
    for attr in HEAD_ATTRIBUTES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            linear_positions = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
            if linear_positions:
                last = linear_positions[-1]
                in_features = head[last].in_features
                # Drop the final Linear and anything after it (e.g. maxvit: nothing; some heads: a trailing act).
                setattr(model, attr, nn.Sequential(*list(head)[:last]) if last else nn.Identity())
                return in_features
    raise ArtsimError(f"embed.model: {type(model).__name__} has no recognisable classification layer "
                      f"(looked for {', '.join(HEAD_ATTRIBUTES)}); it cannot be used as an embedding backbone")


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for a block without changing the caller's RNG state (no global side effects)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _new_backbone(name: str, seed: int, image_size: Optional[int] = None):
    from torchvision.models import get_model

    _check_model_name(name)
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_") and image_size and image_size != DEFAULT_IMAGE_SIZE:
        kwargs["image_size"] = image_size  # ViTs are built for one input size
    with _seeded(seed):
        model = get_model(name, weights=None, **kwargs)
    return model


def _hub_checkpoint_path(url: str) -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))


def download_torchvision_checkpoint(url: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Local path of a torchvision checkpoint: the TORCH_HOME cache, else downloaded there (once, atomically).

    torchvision's file names carry the first hex digits of the file's sha256 ("resnet50-11ad3fa6.pth"); the file is
    checked against them.
    """
    path = _hub_checkpoint_path(url)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, path)
        except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ArtsimError(f"embed.weights: cannot download {url} ({reason}); without internet, copy the file "
                              f"to {path} (TORCH_HOME) or use an artifact URI") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    match = re.search(r"-([a-f0-9]{6,})\.", os.path.basename(path))
    if match:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if not digest.hexdigest().startswith(match.group(1)):
            raise IntegrityError(f"{path}: sha256 does not start with {match.group(1)} as its name says; delete it "
                                 f"and run again")
    return path


def fetch_torchvision_state(url: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict:
    """A torchvision checkpoint's state dict; torch.load with weights_only=True (no arbitrary unpickling)."""
    import torch

    path = download_torchvision_checkpoint(url, timeout_s)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtsimError(f"{path}: cannot load checkpoint: {exc}") from None


def backbone_spec(model: str, weights: Optional[str], seed: int, image_size: Optional[int] = None) -> ModelSpec:
    """The spec of a bare backbone (no head) from a torchvision name and weights name (or None for random init)."""
    if _lite.is_lite_model(model):  # packaged EfficientNet-Lite (efficientnet_lite.py)
        return ModelSpec(**_lite.backbone_spec_fields(model, weights, seed, image_size), feature_dim=0, head=None,
                         output_dim=0, includes_backbone_weights=False)
    resize_ratio = 1.0
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, DEFAULT_IMAGE_SIZE
    weights_name = None
    if weights is not None:
        entry = torchvision_weights(model, weights)
        weights_name = entry.name
        transforms = entry.transforms()
        size = int(transforms.crop_size[0])
        resize_ratio = int(transforms.resize_size[0]) / size
        mean, std = list(transforms.mean), list(transforms.std)
    else:
        _check_model_name(model)
    if image_size is not None:
        size = image_size
    return ModelSpec(backbone=model, backbone_weights=weights_name, image_size=size, mean=list(mean), std=list(std),
                     feature_dim=0, head=None, output_dim=0, includes_backbone_weights=False,
                     resize_size=round(size * resize_ratio), backbone_seed=None if weights_name else seed)


def build_backbone(spec: ModelSpec, backbone_state: Optional[dict] = None):
    """Rebuild the headless backbone a spec describes; returns (module in eval mode, feature_dim)."""
    if _lite.is_lite_model(spec.backbone):  # packaged EfficientNet-Lite (efficientnet_lite.py)
        model, feature_dim = _lite.build_backbone(spec.backbone, spec.backbone_weights, spec.backbone_seed or 0,
                                                  spec.image_size, backbone_state)
        backbone_state = None
    else:
        model = _new_backbone(spec.backbone, spec.backbone_seed or 0, spec.image_size)
        if backbone_state is None and spec.backbone_weights:
            entry = torchvision_weights(spec.backbone, spec.backbone_weights)
            model.load_state_dict(fetch_torchvision_state(entry.url), strict=True)
        feature_dim = strip_classifier(model)
    if backbone_state is not None:
        try:
            model.load_state_dict(backbone_state, strict=True)
        except RuntimeError as exc:
            raise ArtsimError(f"artifact backbone weights do not fit {spec.backbone}: {str(exc)[:500]}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, feature_dim


# ----------------------------------------------------------------------------------------------------------------
# The embedding model


class Embedder(nn.Module):
    """Backbone (+ optional head) -> L2-normalised embeddings.

    - ``forward(x)``: (N, 3, H, W) normalised float -> (N, output_dim) float32, unit length
    - ``preprocess(pil_image)``: -> (3, H, W) normalised float tensor (what forward expects)
    - ``embed_pixels(uint8 (N, H, W, 3))`` / ``embed_pil(images)`` / ``embed_bytes(list of bytes)``: -> numpy
    """

    def __init__(self, spec: ModelSpec, backbone, head, weights_id: str, key: str, weights: Optional[str] = None,
                 seed: int = 0):
        super().__init__()
        self.spec = spec
        self.weights, self.seed = weights, seed  # the embed config values it was built from
        self.backbone = backbone
        self.head = head
        self.weights_id = weights_id
        self.model_key = key

    def forward(self, x):
        import torch.nn.functional as F

        features = self.backbone(x)
        if self.head is not None:
            features = self.head(features)
        # eps far below F.normalize's 1e-12: random-init networks (efficientnet) can emit features near 1e-13
        # that still have a direction; only an all-zero vector stays zero (instead of NaN).
        return F.normalize(features.float(), dim=1, eps=1e-30)

    @property
    def device(self):
        return next(self.parameters()).device

    def preprocess_pixels(self, image_bytes_or_pil) -> np.ndarray:
        """Encoded bytes or a PIL image -> (H, W, 3) uint8 after resize + centre crop."""
        from artsim.models import preprocess as pp

        if isinstance(image_bytes_or_pil, (bytes, bytearray, memoryview)):
            img = pp.decode_rgb(bytes(image_bytes_or_pil), self.spec.resize_size)
        else:
            img = image_bytes_or_pil.convert("RGB")
        return pp.resize_center_crop(img, self.spec.resize_size, self.spec.image_size)

    def preprocess(self, image):
        import torch

        from artsim.models.preprocess import normalize

        pixels = torch.from_numpy(self.preprocess_pixels(image)).unsqueeze(0)
        return normalize(pixels, self.spec.mean, self.spec.std)[0]

    def embed_pixels(self, pixels: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, output_dim) float32 unit vectors. Autocast (bf16/fp16) only on CUDA."""
        import torch

        from artsim.models.preprocess import normalize

        device = self.device
        batch = torch.from_numpy(np.ascontiguousarray(pixels))
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        x = normalize(batch, self.spec.mean, self.spec.std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)  # matches the replica's channels_last weights
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                    if device.type == "cuda" and precision in ("bf16", "fp16") else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self(x)
        return out.float().cpu().numpy()

    def embed_pil(self, images: Sequence, precision: str = "fp32") -> np.ndarray:
        """PIL images (or encoded bytes) -> (N, output_dim) float32 unit vectors (the serving path)."""
        if not images:
            return np.zeros((0, self.spec.output_dim), dtype=np.float32)
        return self.embed_pixels(np.stack([self.preprocess_pixels(im) for im in images]), precision)

    embed_bytes = embed_pil

    def describe(self) -> dict:
        """What embeddings/<model_key>/_model.json holds (copied into index manifests)."""
        return model_description(self.model_key, self.spec, self.weights_id, self.weights, self.seed)


def model_description(key: str, spec: ModelSpec, weights_id: str, weights: Optional[str], seed: int) -> dict:
    """The model part of embeddings/<model_key>/_model.json (the index stage copies it into its manifest).

    ``weights`` and ``seed`` are the embed config's values, so that serving can rebuild the same model with
    ``EmbedConfig(model=backbone, weights=weights, seed=seed)`` and check it by ``weights_id``.
    """
    return {"name": key, "model_key": key, "backbone": spec.backbone, "weights": weights, "seed": seed,
            "weights_id": weights_id, "output_dim": spec.output_dim, "image_size": spec.image_size,
            "resize_size": spec.resize_size, "mean": spec.mean, "std": spec.std, "spec": spec.to_dict()}


def _load_checked_artifact(embed_cfg, storage: Storage, image_size: Optional[int]):
    weights = embed_cfg.weights
    spec, backbone_state, head_state, weights_id = load_artifact(storage, weights)
    if spec.backbone != embed_cfg.model:
        raise ConfigError("embed.model", f"is {embed_cfg.model!r} but the artifact {weights} was trained on "
                                         f"{spec.backbone!r}; set embed.model: {spec.backbone}")
    if image_size is not None and image_size != spec.image_size:
        raise ConfigError("embed.image_size", f"the artifact {weights} was made for {spec.image_size} px; "
                                              f"leave embed.image_size unset")
    return spec, backbone_state, head_state, weights_id


def _torchvision_weights_id(embed_cfg) -> str:
    if _lite.is_lite_model(embed_cfg.model):  # packaged EfficientNet-Lite (efficientnet_lite.py)
        weights = _lite.check_weights_name(embed_cfg.model, embed_cfg.weights)
        return _lite.weights_id(embed_cfg.model, weights, embed_cfg.seed)
    if embed_cfg.weights is None:
        return f"random-init-seed-{embed_cfg.seed}"
    entry = torchvision_weights(embed_cfg.model, embed_cfg.weights)
    return f"torchvision:{type(entry).__name__}.{entry.name}"


def describe_model(embed_cfg, storage: Optional[Storage] = None,
                   image_size: Optional[int] = None) -> tuple[ModelSpec, str]:
    """(spec, weights_id) for an EmbedConfig without building the network's weights (fast; for drivers).

    Fails exactly where build_embedder would: bad names, missing/tampered artifacts, weights that cannot be
    downloaded (a torchvision checkpoint is fetched into the cache here, so that replicas find it there).
    """
    import torch

    storage = storage or Storage()
    image_size = image_size if image_size is not None else getattr(embed_cfg, "image_size", None)
    if embed_cfg.weights is not None and is_artifact_uri(embed_cfg.weights):
        spec, _, _, weights_id = _load_checked_artifact(embed_cfg, storage, image_size)
        return spec, weights_id
    spec = backbone_spec(embed_cfg.model, embed_cfg.weights, embed_cfg.seed, image_size)
    if _lite.is_lite_model(spec.backbone):  # packaged EfficientNet-Lite: the file is local, or a clear error
        if spec.backbone_weights:
            _lite.weights_path()
        spec.feature_dim = spec.output_dim = _lite.FEATURE_DIM
        return spec, _torchvision_weights_id(embed_cfg)
    if spec.backbone_weights:
        download_torchvision_checkpoint(torchvision_weights(spec.backbone, spec.backbone_weights).url)
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model = _new_backbone(spec.backbone, spec.backbone_seed or 0, spec.image_size)
    spec.feature_dim = spec.output_dim = strip_classifier(model)
    return spec, _torchvision_weights_id(embed_cfg)


def build_embedder(embed_cfg, storage: Optional[Storage] = None, image_size: Optional[int] = None) -> Embedder:
    """The embedding model for an EmbedConfig (fields used: model, weights, seed, and image_size if it has one).

    weights: None -> random init seeded by embed.seed (identical in every process); a torchvision weights name;
    or an artifact URI (local, file://, s3://) written by save_artifact.
    """
    storage = storage or Storage()
    image_size = image_size if image_size is not None else getattr(embed_cfg, "image_size", None)
    weights = embed_cfg.weights
    key = model_key(embed_cfg)
    if weights is not None and is_artifact_uri(weights):
        spec, backbone_state, head_state, weights_id = _load_checked_artifact(embed_cfg, storage, image_size)
        backbone, feature_dim = build_backbone(spec, backbone_state)
        if feature_dim != spec.feature_dim:
            raise ArtsimError(f"{weights}: feature_dim {spec.feature_dim} but {spec.backbone} gives {feature_dim}")
        head = None
        if spec.head is not None:
            head = build_head(spec.head)
            head.load_state_dict(head_state, strict=True)
            head.eval()
            for p in head.parameters():
                p.requires_grad_(False)
        return Embedder(spec, backbone, head, weights_id, key, weights, embed_cfg.seed)
    spec = backbone_spec(embed_cfg.model, weights, embed_cfg.seed, image_size)
    backbone, feature_dim = build_backbone(spec)
    spec.feature_dim = spec.output_dim = feature_dim
    return Embedder(spec, backbone, None, _torchvision_weights_id(embed_cfg), key, weights, embed_cfg.seed)


__all__ = [
    "ARTIFACT_FORMAT", "Embedder", "ModelSpec", "backbone_spec", "build_backbone", "build_embedder", "build_head",
    "describe_model", "download_torchvision_checkpoint", "fetch_torchvision_state", "model_description", "is_artifact_uri", "load_artifact", "model_key", "save_artifact", "strip_classifier",
    "torchvision_weights",
]
