"""Triplet margin loss on cosine distance, with optional in-batch mining (plain torch, no Ray).

Embeddings are L2-normalised, so cosine distance is ``1 - a·b`` in [0, 2]; the loss per triplet is
``max(0, d(a, p) - d(a, n) + margin)`` ("Training the Archive": cosine triplet loss, margin 0.2).

Mining replaces each triplet's negative by another object of the same batch:
- ``batch_hard``: the closest valid negative (Hermans et al., "In Defense of the Triplet Loss");
- ``semi_hard``: the closest valid negative that is still farther than the positive (FaceNet); where none exists
  the mined negative is kept.
"Valid" is decided by the caller (``valid_negatives``): never the anchor or its positive, never an object known to
be similar to the anchor. A triplet's own negative is always valid.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

MINING = ("none", "batch_hard", "semi_hard")


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - (x * y).sum(dim=-1)


def triplet_loss(embeddings: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                 margin: float, mining: str = "none", valid_negatives: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, dict]:
    """Mean triplet loss over a batch.

    embeddings: (U, d) unit vectors of the batch's distinct objects; anchors/positives/negatives: (B,) indices into
    them; valid_negatives: (B, U) bool, needed for mining. Returns (loss, stats) where stats holds the fraction of
    triplets that violate the margin ("active") and the mean distances, for logging.
    """
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
    ea, ep = embeddings[anchors], embeddings[positives]
    d_ap = cosine_distance(ea, ep)
    d_an = cosine_distance(ea, embeddings[negatives])
    if mining != "none":
        if valid_negatives is None:
            raise ValueError(f"mining={mining} needs valid_negatives")
        valid = valid_negatives.clone()
        valid[torch.arange(len(anchors)), negatives] = True
        dist = 1.0 - ea @ embeddings.T  # (B, U)
        big = torch.finfo(dist.dtype).max
        if mining == "batch_hard":
            d_an = torch.where(valid, dist, torch.full_like(dist, big)).min(dim=1).values
        else:
            semi = valid & (dist > d_ap.detach().unsqueeze(1))
            hardest_semi = torch.where(semi, dist, torch.full_like(dist, big)).min(dim=1).values
            d_an = torch.where(semi.any(dim=1), hardest_semi, d_an)
    losses = torch.relu(d_ap - d_an + margin)
    with torch.no_grad():
        stats = {"active": float((losses > 0).float().mean()), "d_ap": float(d_ap.mean()),
                 "d_an": float(d_an.mean())}
    return losses.mean(), stats


def neighbourhood_loss(embeddings: torch.Tensor, start_embeddings: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the batch's pairwise cosine similarities from the start model's
    (``train.preserve_neighbourhoods``): the triplets may move what the curators' criteria join, but every other
    pair keeps the similarity the pretrained model gave it -- what the pretrained network does well (a creator's
    works together) is not traded away for the mined criteria. Zero at the start; both inputs are unit vectors."""
    now = embeddings @ embeddings.T
    then = start_embeddings @ start_embeddings.T
    return ((now - then) ** 2).mean()


def valid_negative_mask(anchor_objects: np.ndarray, positive_objects: np.ndarray, batch_objects: np.ndarray,
                        positive_pair_keys: np.ndarray, n_objects: int) -> np.ndarray:
    """(B, U) bool: may batch object u serve as a negative for triplet b?

    Not the anchor, not the positive, and not any object that some triplet names as similar to the anchor
    (``positive_pair_keys``: sorted int64 keys ``min(x, y) * n_objects + max(x, y)`` of all known positive pairs).
    All arguments are global object indices.
    """
    a = anchor_objects[:, None]
    u = batch_objects[None, :]
    lo, hi = np.minimum(a, u), np.maximum(a, u)
    keys = lo * np.int64(n_objects) + hi
    pos = np.searchsorted(positive_pair_keys, keys)
    pos = np.minimum(pos, max(len(positive_pair_keys) - 1, 0))
    known_similar = (positive_pair_keys[pos] == keys) if len(positive_pair_keys) else np.zeros(keys.shape, bool)
    return ~known_similar & (u != a) & (u != positive_objects[:, None])


def positive_pair_keys(anchors: np.ndarray, positives: np.ndarray, n_objects: int) -> np.ndarray:
    lo, hi = np.minimum(anchors, positives), np.maximum(anchors, positives)
    return np.unique(lo.astype(np.int64) * np.int64(n_objects) + hi.astype(np.int64))
