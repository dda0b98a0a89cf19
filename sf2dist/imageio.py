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


def decode_image(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Decode JPEG (or any Pillow-readable) bytes to an RGB uint8 array [H, W, 3].

    With `out` (a writable, C-contiguous uint8 [H, W, 3] array) an image of that shape is
    decoded straight into it and `out` is returned; an image of another shape comes back
    in a new array, for the caller to refuse.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise ImageDecodeError("empty image (0 bytes)")
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            if out is not None and simplejpeg.decode_jpeg_header(data)[:2] == out.shape[:2]:
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
                return out
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # fall through to Pillow, which reports the reason in its own words
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as err:
        # Pillow's own message here holds the repr of its buffer object: say what it means
        what = "starts like a JPEG but its header is unreadable" if data[:2] == b"\xff\xd8" else (
            "not in any image format Pillow reads"
        )
        raise ImageDecodeError(
            f"cannot decode image ({len(data)} bytes): {what} (first bytes: {data[:8].hex(' ')})"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {err}") from err
    if out is not None and pixels.shape == out.shape:
        out[...] = pixels
        return out
    return pixels


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
    return normalize_batch(torch.from_numpy(np.ascontiguousarray(image))[None])[0]


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 [b, H, W, 3] -> float32 [b, 3, H, W] in [-1, 1], on the images' device.

    The training loader ships uint8 batches and calls this after moving them to the device,
    so on a GPU the conversion costs no CPU time and a quarter of the transfer.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [b, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    # transposed while still 1 byte per pixel, then converted: the cheapest order on CPU
    return images.permute(0, 3, 1, 2).contiguous().float().sub_(127.5).div_(127.5)
