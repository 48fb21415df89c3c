"""Lossless image storage for a store's held-out images and replay buffer.

A version keeps its images as PNG bytes, not as decoded uint8 pixels: PNG is lossless, so what is
decoded on load is bit-identical to what was saved and nothing the forgetting gate or the replay
measures changes, while a device's flash holds a fraction of the bytes. An image whose three
channels are equal (a grayscale source such as Fashion-MNIST) is stored as one channel and
expanded again on load, which is exact as well.

The packed form is three arrays that fit in an ``.npz``: ``png`` (all images' bytes, one after
the other), ``png_offsets`` (where each starts, plus the end) and ``image_shape`` (H, W, C).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

# zlib level 1: about as small as the default level on these images and several times faster to write
# (every update rewrites every held-out image of the version it publishes).
PNG_LEVEL = 1
_THREADS = 2  # PIL's encoder and decoder release the GIL


def _encode_one(img: np.ndarray) -> bytes:
    grey = bool((img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all())
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., 0] if grey else img)).save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def encode_images(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 [N, H, W, 3] -> the packed PNG arrays (``png``, ``png_offsets``, ``image_shape``)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    with ThreadPoolExecutor(_THREADS) as pool:
        blobs = list(pool.map(_encode_one, pixels))
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    return {
        "png": np.frombuffer(b"".join(blobs), np.uint8),
        "png_offsets": offsets,
        "image_shape": np.array(pixels.shape[1:], np.int64),
    }


def decode_images(png: np.ndarray, offsets: np.ndarray, image_shape: np.ndarray) -> np.ndarray:
    """The packed PNG arrays -> uint8 [N, H, W, 3]. Raises ValueError when they do not fit together
    or an image does not decode to ``image_shape``."""
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or shape[2] != 3 or not all(0 < v <= 4096 for v in shape[:2]):
        raise ValueError(f"image_shape must be (H, W, 3) with sides up to 4096, got {shape}")
    offsets = np.asarray(offsets, np.int64)
    if (
        offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != len(png)
        or np.any(np.diff(offsets) < 1)
    ):
        raise ValueError("png_offsets do not partition the png bytes")
    data = np.asarray(png, np.uint8).tobytes()
    out = np.empty((len(offsets) - 1, *shape), np.uint8)

    def decode(i: int) -> None:
        with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]]), formats=["PNG"]) as img:
            if img.size != (shape[1], shape[0]) or img.mode not in ("L", "RGB"):
                raise ValueError(f"stored image {i} is {img.mode} {img.size}, expected {shape[1]}x{shape[0]}")
            out[i] = np.asarray(img.convert("RGB"))

    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(decode, range(len(out))))
    return out
