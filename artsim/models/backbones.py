"""Backbones: torchvision classifiers by name (pooled penultimate features), their weights from torchvision's
registry (torch.hub's downloader and cache), seeded random init, the packaged EfficientNet-Lite, and open_clip /
timm models by name (hub_models.py)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import urllib.parse
from typing import Any, Optional

import torch.nn as nn

from artsim.errors import ArtsimError, ConfigError, IntegrityError
from artsim.models.state import load_backbone_state
from artsim.models import efficientnet_lite as _lite
from artsim.models import hub_models as _hub
from artsim.models.spec import (DEFAULT_IMAGE_SIZE, DOWNLOAD_TIMEOUT_S, HEAD_ATTRIBUTES, IMAGENET_MEAN, IMAGENET_STD,
                                ModelSpec)


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


def fetch_torchvision_state(url: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict:
    """A torchvision checkpoint's state dict, through torch.hub's own downloader and cache (TORCH_HOME; the file
    name's hash prefix is checked, the file is loaded with ``weights_only=True``: no arbitrary unpickling). torch.hub
    sets no timeout, so it runs under a deadline: no network is a clear error within ``timeout_s``, never a hang."""
    import threading

    import torch

    result: dict = {}

    def fetch():
        try:
            result["state"] = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False,
                                                                 check_hash=True, weights_only=True)
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    # torch.hub checks a file's hash prefix when it downloads it, not when it finds it in the cache: check that here
    # (a truncated or altered cached file is refused before torch.load sees it).
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))
    match = re.search(r"-([a-f0-9]{6,})\.", os.path.basename(cached))
    if match and os.path.exists(cached):
        digest = hashlib.sha256()
        with open(cached, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if not digest.hexdigest().startswith(match.group(1)):
            raise IntegrityError(f"{cached}: sha256 does not start with {match.group(1)} as its name says; delete it "
                                 f"and run again")
    worker = threading.Thread(target=fetch, daemon=True, name="artsim-weights-download")
    worker.start()
    worker.join(timeout_s)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    hint = f"without internet, copy the file into {cache} (TORCH_HOME) or use an artifact URI"
    if worker.is_alive():
        raise ArtsimError(f"embed.weights: downloading {url} took longer than {timeout_s:g} s; {hint}")
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, RuntimeError) and "invalid hash value" in str(exc):
            raise IntegrityError(f"embed.weights: {url}: the downloaded file's sha256 does not match its name") from None
        reason = getattr(exc, "reason", exc)
        raise ArtsimError(f"embed.weights: cannot download or load {url} ({reason}); {hint}") from None
    return result["state"]


def backbone_spec(model: str, weights: Optional[str], seed: int, image_size: Optional[int] = None) -> ModelSpec:
    """The spec of a bare backbone (no head) from a torchvision name and weights name (or None for random init)."""
    if _lite.is_lite_model(model):  # packaged EfficientNet-Lite (efficientnet_lite.py)
        return ModelSpec(**_lite.backbone_spec_fields(model, weights, seed, image_size), feature_dim=0, head=None,
                         output_dim=0, includes_backbone_weights=False)
    if _hub.is_hub_model(model):  # open_clip:<arch> / timm:<name> (hub_models.py)
        return ModelSpec(**_hub.backbone_spec_fields(model, weights, seed, image_size), head=None,
                         includes_backbone_weights=False)
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
    elif _hub.is_hub_model(spec.backbone):  # open_clip:<arch> / timm:<name> (hub_models.py); image tower only
        model, feature_dim, _ = _hub.build_backbone(spec.backbone, spec.backbone_weights, spec.backbone_seed or 0,
                                                    spec.image_size, backbone_state, with_text=False)
        backbone_state = None
    else:
        model = _new_backbone(spec.backbone, spec.backbone_seed or 0, spec.image_size)
        if backbone_state is None and spec.backbone_weights:
            entry = torchvision_weights(spec.backbone, spec.backbone_weights)
            model.load_state_dict(fetch_torchvision_state(entry.url), strict=True)
        feature_dim = strip_classifier(model)
    if backbone_state is not None:
        load_backbone_state(model, backbone_state, spec.backbone)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, feature_dim
