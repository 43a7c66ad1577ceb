"""What an embedding model is: ``ModelSpec`` (backbone, weights, preprocessing, head, dimensions) and the
ImageNet preprocessing constants. Shared by backbones, heads, the artifact format and the Embedder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from artsim.errors import ArtsimError
from artsim.models.heads import build_head


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
    # CLIP (open_clip:<arch>) artifacts only: {"tokenizer": <open_clip arch>} when the artifact also carries the
    # text tower (tensors "text.*"), so that a service can embed text queries with no network at all
    text_tower: Optional[dict] = None

    def __post_init__(self):
        if self.resize_size is None:
            self.resize_size = self.image_size

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["text_tower"] is None:  # every spec without a text tower reads exactly as before the field existed
            del data["text_tower"]
        return data

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
        need("backbone", lambda v: isinstance(v, str) and v, "a model name")
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
        need("text_tower", lambda v: v is None or (isinstance(v, dict) and set(v) == {"tokenizer"}
                                                   and isinstance(v["tokenizer"], str) and v["tokenizer"] != ""),
             'null or {"tokenizer": <open_clip model name>}')
        if data.get("text_tower") is not None:
            if not str(data.get("backbone")).startswith("open_clip:") or data.get("head") is not None:
                raise ArtsimError(f"{where}.text_tower: only a CLIP model (open_clip:<arch>) without a head carries "
                                  f"a text tower")
            if data["text_tower"]["tokenizer"] != str(data["backbone"]).split(":", 1)[1]:
                raise ArtsimError(f"{where}.text_tower.tokenizer: must be the model's own ({data['backbone']})")
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
