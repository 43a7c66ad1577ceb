"""Checks on what a client sends (plain functions, no HTTP): image uploads, JSON vectors and texts, k.

Every upload is hostile. Images are held to the download stage's caps: ``download.max_bytes`` for the body and
``download.max_pixels`` for the decoded size (lowered to the embed stage's decode cap when that is smaller), the
pixel count read from the header *before* any pixel is decoded; the type is sniffed from the bytes, never taken
from Content-Type.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from artsim.config import DownloadConfig


class BadRequest(Exception):
    """A client error: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _default_max_pixels() -> int:
    from artsim.models.preprocess import MAX_DECODE_PIXELS

    return min(DownloadConfig().max_pixels, MAX_DECODE_PIXELS)


@dataclass
class Limits:
    max_k: int = 1000
    max_upload_bytes: int = DownloadConfig().max_bytes
    max_pixels: int = 0  # 0: the download / embed caps (see module doc)
    max_json_bytes: int = 1_000_000
    max_text_chars: int = 1000

    def __post_init__(self):
        if not self.max_pixels:
            self.max_pixels = _default_max_pixels()


def check_k(k: int, limits: Limits) -> int:
    if k < 1:
        raise BadRequest(400, f"k must be at least 1, got {k}")
    if k > limits.max_k:
        raise BadRequest(400, f"k={k} is above this server's cap of {limits.max_k}")
    return k


def check_image(data: bytes, limits: Limits) -> None:
    """Raise BadRequest unless ``data`` is a supported raster image within the byte and pixel caps."""
    from PIL import Image

    from artsim.image_format import sniff_format

    if len(data) > limits.max_upload_bytes:
        raise BadRequest(413, f"image of {len(data)} bytes is over the {limits.max_upload_bytes}-byte limit")
    if not data:
        raise BadRequest(400, "empty image body")
    kind = sniff_format(data)
    if kind is None:
        raise BadRequest(415, "the body is not a supported image (JPEG, PNG, GIF, WEBP, TIFF, BMP; sniffed from "
                              "its bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[kind]) as img:  # reads the header only
                width, height = img.size
        except Image.DecompressionBombError as exc:
            raise BadRequest(413, f"image too large: {exc}") from None
        except Exception as exc:  # hostile or truncated header
            raise BadRequest(400, f"cannot read the {kind} image: {exc}") from None
    if width < 1 or height < 1:
        raise BadRequest(400, f"image has bad dimensions {width}x{height}")
    if width * height > limits.max_pixels:
        raise BadRequest(413, f"image of {width}x{height} = {width * height} pixels is over the "
                              f"{limits.max_pixels}-pixel limit")


def parse_json_query(body: Any, dim: int, limits: Limits) -> tuple[str, Any]:
    """``{"vector": [...]}`` -> ("vector", (1, dim) float32); ``{"text": "..."}`` -> ("text", str)."""
    if not isinstance(body, dict):
        raise BadRequest(400, 'expected a JSON object: {"vector": [...]} or {"text": "..."}')
    keys = set(body) & {"vector", "text"}
    if len(keys) != 1:
        raise BadRequest(400, 'expected exactly one of "vector" and "text" in the JSON body')
    unknown = set(body) - keys
    if unknown:
        raise BadRequest(400, f"unknown field(s) in the JSON body: {', '.join(sorted(unknown))}")
    if "text" in body:
        text = body["text"]
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(400, '"text" must be a non-empty string')
        if len(text) > limits.max_text_chars:
            raise BadRequest(400, f'"text" has {len(text)} characters; the limit is {limits.max_text_chars}')
        return "text", text
    vector = body["vector"]
    if not isinstance(vector, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in vector):
        raise BadRequest(400, '"vector" must be a list of numbers')
    if len(vector) != dim:
        raise BadRequest(400, f'"vector" has {len(vector)} numbers; this index holds {dim}-d vectors')
    if not all(math.isfinite(v) for v in vector):
        raise BadRequest(400, '"vector" contains NaN or infinity')
    with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, refused just below
        arr = np.asarray(vector, dtype=np.float32)[None, :]
    if not np.isfinite(arr).all():
        raise BadRequest(400, '"vector" has a value outside float32 range')
    if not np.any(arr):
        raise BadRequest(400, '"vector" is all zeros')
    return "vector", arr
