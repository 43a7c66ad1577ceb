"""Image bytes -> fixed-size uint8 pixels -> normalised float tensors.

Split in two on purpose: decoding and resizing (CPU, PIL) run in Ray Data tasks and hand uint8 arrays to the model
actors (4x smaller than float32 in the object store); normalisation runs inside the model, on the accelerator when
there is one. The serving path (`Embedder.embed_pil`) uses the same two functions, so query vectors and stored
vectors come from identical pixels.

Every image is hostile: the decoded size is checked from the header before pixels are decoded, and any failure is
reported as a status string instead of an exception.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np

# Above this, an image is refused before decoding (decompression bombs). The download stage already resizes images
# to ~384 px, so anything this large did not come from it.
MAX_DECODE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image that can be embedded; the message says why."""


def decode_rgb(data: bytes, target_short_side: int):
    """Decode encoded image bytes to an RGB PIL image whose shorter side is at least ``target_short_side``.

    For JPEG, ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly (several times faster for large
    images); it never goes below the requested size, so quality after the final resize is unaffected.
    """
    from PIL import Image

    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width < 1 or height < 1 or width * height > MAX_DECODE_PIXELS:
                raise ImageDecodeError(f"refusing to decode a {width}x{height} image")
            if img.format == "JPEG":
                scale = min(width, height) / max(target_short_side, 1)
                if scale >= 2:
                    img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            img = img.convert("RGB")  # forces the decode; also drops alpha and palette
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt or hostile files
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return img


def resize_center_crop(img, resize_size: int, crop_size: int) -> np.ndarray:
    """Resize so the shorter side is ``resize_size``, then take the centred ``crop_size`` square: (H, W, 3) uint8.

    This is torchvision's classification preprocessing (Resize(resize_size) + CenterCrop(crop_size)), done with PIL
    so that it runs without torch in light-weight CPU tasks.
    """
    from PIL import Image

    width, height = img.size
    scale = resize_size / min(width, height)
    new_w, new_h = max(crop_size, round(width * scale)), max(crop_size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
    img = img.crop((left, top, left + crop_size, top + crop_size))
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def image_to_pixels(data: bytes, resize_size: int, crop_size: int) -> np.ndarray:
    """Encoded bytes -> (crop_size, crop_size, 3) uint8; raises ImageDecodeError."""
    return resize_center_crop(decode_rgb(data, resize_size), resize_size, crop_size)


def pixels_batch(images: Sequence[bytes | None], resize_size: int, crop_size: int) -> tuple[np.ndarray, list[str]]:
    """Preprocess a batch; a bad image gets a zero array and an error message instead of failing the batch.

    Returns (N, crop, crop, 3) uint8 and one message per image ("" for images that decoded).
    """
    out = np.zeros((len(images), crop_size, crop_size, 3), dtype=np.uint8)
    errors: list[str] = []
    for i, data in enumerate(images):
        try:
            if data is None:
                raise ImageDecodeError("no image bytes")
            out[i] = image_to_pixels(bytes(data), resize_size, crop_size)
            errors.append("")
        except ImageDecodeError as exc:
            errors.append(str(exc)[:300])
    return out, errors


def normalize(pixels, mean: Sequence[float], std: Sequence[float]):
    """(N, H, W, 3) uint8 tensor -> (N, 3, H, W) float32 normalised tensor, on the pixels' device."""
    import torch

    x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def preprocess_batch(batch: dict, resize_size: int, crop_size: int) -> dict:
    """Ray Data batch (numpy format) of images/ rows -> object_id, pixels (uint8 NHWC), error, prep_s.

    ``prep_s`` carries this batch's wall time spread over its rows, so the driver can add up where time went.
    Plain function (no torch import): preprocessing tasks stay light.
    """
    import time

    start = time.perf_counter()
    pixels, errors = pixels_batch(list(batch["image"]), resize_size, crop_size)
    n = len(errors)
    elapsed = time.perf_counter() - start
    return {"object_id": np.asarray(batch["object_id"], dtype=object), "pixels": pixels,
            "error": np.asarray(errors, dtype=object), "prep_s": np.full(n, elapsed / max(n, 1))}
