"""The embed stage: images/ -> embeddings/<model_key>/ with a torchvision backbone (+ an artsim-trained head).

`run_embed(ctx)` is the Ray Data pipeline (artsim/embed/ray_embed.py); the model artifact format and model
building live in artsim/models/; image preprocessing in artsim/models/preprocess.py.
"""
from __future__ import annotations


def run_embed(ctx, **options) -> dict:
    from artsim.embed.ray_embed import run_embed as _run_embed  # lazy: `artsim ingest` need not import torch

    return _run_embed(ctx, **options)


__all__ = ["run_embed"]
