"""Image bytes <-> arrays <-> network input: the one place that decodes and normalises faces.

The loader, the converters, the synthetic generator and the evaluation all go through these
functions, so training and evaluation see identically prepared pixels.
"""
from __future__ import annotations

import io

import numpy as np
import torch

try:  # simplejpeg is about 2x faster than Pillow on 112x112 faces (NOTES.md)
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a declared dependency
    simplejpeg = None

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded as an image; the message says why."""


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG (or any Pillow-readable) bytes to an RGB uint8 array [H, W, 3]."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise ImageDecodeError("empty image (0 bytes)")
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # fall through to Pillow, which reports the reason in its own words
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {err}") from err


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode an RGB uint8 array [H, W, 3] as JPEG bytes."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] ((x - 127.5) / 127.5)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor.sub_(127.5).div_(127.5)
