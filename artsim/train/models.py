"""The trainable models of the two train modes, built only from artsim.models.artifact pieces so that what is
trained is exactly what ``embed.weights: models/<name>/export`` rebuilds.

- ``head``: a projection head over cached embeddings. Heads have no bias: the cached embeddings are L2-normalised
  backbone features, while the embed stage feeds the head *raw* features before normalising its output. A linear
  (or ReLU-MLP) map without bias is positively homogeneous, so normalise(head(x / |x|)) == normalise(head(x)) and
  the exported model reproduces the trained embedding exactly.
- ``finetune``: backbone + head on images, trained end to end. BatchNorm layers stay in eval mode: per-worker
  batches are small (statistics would be noise) and the embed stage runs the backbone in eval mode anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def head_description(in_dim: int, out_dim: int, hidden_dims: list[int], center: bool = False,
                     head_type: str = "projection") -> dict:
    """The head spec for train.head_type; for "residual", ``out_dim`` (train.head_dim) is the adapter's rank."""
    if head_type == "residual":
        return {"type": "residual", "in_dim": in_dim, "rank": min(out_dim, in_dim), "out_dim": in_dim}
    head = {"type": "linear", "in_dim": in_dim, "out_dim": out_dim, "bias": False}
    if hidden_dims:
        head = {"type": "mlp", "in_dim": in_dim, "hidden_dims": list(hidden_dims), "out_dim": out_dim, "bias": False}
    if center:
        head["center"] = True
    return head


class HeadModel(nn.Module):
    """features (N, in_dim) -> unit vectors (N, out_dim)."""

    def __init__(self, head_dict: dict):
        super().__init__()
        from artsim.models.heads import build_head

        self.head = build_head(head_dict)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=1, eps=1e-12)


class FinetuneModel(nn.Module):
    """normalised pixels (N, 3, H, W) -> unit vectors (N, out_dim)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1, eps=1e-12)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # see module docstring
        return self


def split_state(state: dict) -> tuple[dict, dict]:
    """(backbone_state, head_state) from a model state dict with "backbone."/"head." prefixes."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    return backbone, head
