"""The one way to build an embedding model from ``embed.model`` / ``embed.weights``: ``build_embedder`` ->
``Embedder`` (backbone [+ head], preprocessing, batched embedding) and ``describe_model`` (what _model.json
records). Embed, train and serving all build their model here, so they agree."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import torch.nn as nn

from artsim.errors import ArtsimError, ConfigError
from artsim.models import efficientnet_lite as _lite
from artsim.models import hub_models as _hub
from artsim.models.artifact import load_artifact_parts, save_artifact
from artsim.models.backbones import (_new_backbone, backbone_spec, build_backbone, fetch_torchvision_state,
                                     strip_classifier, torchvision_weights)
from artsim.models.heads import build_head
from artsim.models.spec import ModelSpec
from artsim.rundir.names import is_artifact_uri, model_key
from artsim.storage import Storage


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


class ClipEmbedder(Embedder):
    """An Embedder over a CLIP image tower that also embeds text with the same model's text tower: texts and images
    land in one space, L2-normalised the same way, so a text query searches an index of the image vectors."""

    def __init__(self, *args, text_tower, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_tower = text_tower

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, output_dim) float32 unit vectors (the tokenizer truncates to the model's context)."""
        import torch
        import torch.nn.functional as F

        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ArtsimError(f"text query {i}: expected a non-empty string, got {text!r:.60}")
        if not texts:
            return np.zeros((0, self.spec.output_dim), dtype=np.float32)
        with torch.inference_mode():
            features = self.text_tower(texts)
        return F.normalize(features.float(), dim=1, eps=1e-30).cpu().numpy()


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
    spec, backbone_state, head_state, text_state, weights_id = load_artifact_parts(storage, weights)
    if spec.backbone != embed_cfg.model:
        raise ConfigError("embed.model", f"is {embed_cfg.model!r} but the artifact {weights} was trained on "
                                         f"{spec.backbone!r}; set embed.model: {spec.backbone}")
    if image_size is not None and image_size != spec.image_size:
        raise ConfigError("embed.image_size", f"the artifact {weights} was made for {spec.image_size} px; "
                                              f"leave embed.image_size unset")
    return spec, backbone_state, head_state, text_state, weights_id


def _torchvision_weights_id(embed_cfg) -> str:
    if _lite.is_lite_model(embed_cfg.model):  # packaged EfficientNet-Lite (efficientnet_lite.py)
        weights = _lite.check_weights_name(embed_cfg.model, embed_cfg.weights)
        return _lite.weights_id(embed_cfg.model, weights, embed_cfg.seed)
    if _hub.is_hub_model(embed_cfg.model):  # open_clip:<arch> / timm:<name> (hub_models.py)
        return _hub.weights_id(embed_cfg.model, embed_cfg.weights, embed_cfg.seed)
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
        spec, _, _, _, weights_id = _load_checked_artifact(embed_cfg, storage, image_size)
        return spec, weights_id
    spec = backbone_spec(embed_cfg.model, embed_cfg.weights, embed_cfg.seed, image_size)
    if _lite.is_lite_model(spec.backbone):  # packaged EfficientNet-Lite: the file is local, or a clear error
        if spec.backbone_weights:
            _lite.weights_path()
        spec.feature_dim = spec.output_dim = _lite.FEATURE_DIM
        return spec, _torchvision_weights_id(embed_cfg)
    if _hub.is_hub_model(spec.backbone):  # fetched into this node's cache now (or a clear error within seconds)
        _hub.fetch_weights(spec.backbone, spec.backbone_weights)
        spec.feature_dim = spec.output_dim = _hub.feature_dim(spec.backbone, spec.image_size)
        return spec, _torchvision_weights_id(embed_cfg)
    if spec.backbone_weights:
        fetch_torchvision_state(torchvision_weights(spec.backbone, spec.backbone_weights).url)  # fetchable, or a clear error
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model = _new_backbone(spec.backbone, spec.backbone_seed or 0, spec.image_size)
    spec.feature_dim = spec.output_dim = strip_classifier(model)
    return spec, _torchvision_weights_id(embed_cfg)


def build_embedder(embed_cfg, storage: Optional[Storage] = None, image_size: Optional[int] = None,
                   with_text: bool = True) -> Embedder:
    """The embedding model for an EmbedConfig (fields used: model, weights, seed, and image_size if it has one).

    weights: None -> random init seeded by embed.seed (identical in every process); a torchvision weights name;
    or an artifact URI (local, file://, s3://) written by save_artifact. ``with_text=False``: a CLIP model's text
    tower is not kept (image-only replicas; ViT-B-32's is 63M parameters).
    """
    storage = storage or Storage()
    image_size = image_size if image_size is not None else getattr(embed_cfg, "image_size", None)
    weights = embed_cfg.weights
    key = model_key(embed_cfg)
    if weights is not None and is_artifact_uri(weights):
        spec, backbone_state, head_state, text_state, weights_id = _load_checked_artifact(embed_cfg, storage,
                                                                                          image_size)
        text_tower = None
        if _hub.is_hub_model(spec.backbone):  # a CLIP artifact may carry its text tower (no network needed)
            backbone, feature_dim, text_tower = _hub.build_backbone(
                spec.backbone, spec.backbone_weights, spec.backbone_seed or 0, spec.image_size, backbone_state,
                with_text=with_text and spec.head is None, text_state=text_state)
        else:
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
        if text_tower is not None:
            return ClipEmbedder(spec, backbone, head, weights_id, key, weights, embed_cfg.seed, text_tower=text_tower)
        return Embedder(spec, backbone, head, weights_id, key, weights, embed_cfg.seed)
    spec = backbone_spec(embed_cfg.model, weights, embed_cfg.seed, image_size)
    if _hub.is_hub_model(spec.backbone):  # open_clip:<arch> / timm:<name>; CLIP also brings its text tower
        backbone, feature_dim, text_tower = _hub.build_backbone(spec.backbone, spec.backbone_weights,
                                                                spec.backbone_seed or 0, spec.image_size,
                                                                with_text=with_text)
        spec.feature_dim = spec.output_dim = feature_dim
        args = (spec, backbone, None, _torchvision_weights_id(embed_cfg), key, weights, embed_cfg.seed)
        if text_tower is not None:
            return ClipEmbedder(*args, text_tower=text_tower)
        return Embedder(*args)
    backbone, feature_dim = build_backbone(spec)
    spec.feature_dim = spec.output_dim = feature_dim
    return Embedder(spec, backbone, None, _torchvision_weights_id(embed_cfg), key, weights, embed_cfg.seed)


def save_clip_artifact(embedder: "ClipEmbedder", storage: Storage, uri: str) -> str:
    """Write a CLIP embedder (image tower + text tower + tokenizer name) as an artsim artifact at ``uri``; returns its
    weights_id. ``embed.model: <the same open_clip:<arch>>`` with ``embed.weights: <uri>`` rebuilds it on any node
    or service with no network and no Hugging Face cache, text queries included."""
    import dataclasses

    if not isinstance(embedder, ClipEmbedder) or embedder.head is not None:
        raise ArtsimError("save_clip_artifact: needs a CLIP embedder (embed.model: open_clip:<arch>) without a head")
    arch = embedder.spec.backbone.split(":", 1)[1]
    spec = dataclasses.replace(embedder.spec, includes_backbone_weights=True, text_tower={"tokenizer": arch})
    return save_artifact(storage, uri, spec, backbone_state=embedder.backbone.state_dict(),
                         text_state=embedder.text_tower.state_dict())


__all__ = ["ClipEmbedder", "Embedder", "build_embedder", "describe_model", "model_description",
           "save_clip_artifact"]
