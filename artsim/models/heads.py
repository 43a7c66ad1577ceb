"""Trainable heads over backbone features: ``build_head(description)`` -> a torch module (linear / mlp projection,
or the identity-initialised residual head whose epoch 0 is the pretrained model)."""
from __future__ import annotations

import torch.nn as nn

from artsim.errors import ArtsimError


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
