"""Domain shifts for domain-incremental protocols: the same classes seen through another camera.

Every shift maps uint8 RGB images ``(N, H, W, 3)`` to new ones of the same shape and dtype and is
deterministic for a seed: the per-image strengths are drawn from ``numpy.random.default_rng(seed)``,
so every run (and every run seed) of a protocol sees the same shifted pixels. Shifts act on the
images at the protocol's size (after any resize), as a camera would deliver them to the device.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[np.ndarray, int], np.ndarray]

# BT.601 luma weights: what Pillow's convert("L") uses, i.e. what a greyscale camera mode gives.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
LOW_LIGHT_GAMMA = 2.0  # darkens mid-tones more than highlights, as an under-exposed sensor does
LOW_LIGHT_BRIGHTNESS = (0.35, 0.6)  # overall exposure, drawn per image
BLUR_SIGMA_AT_32PX = (1.0, 1.6)  # Gaussian std in pixels for a 32-px image, drawn per image; scales with size
JPEG_QUALITY = (5, 15)  # Pillow quality, drawn per image: blocking and chroma bleeding at 32 px


def _check(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")


def identity(images: np.ndarray, seed: int) -> np.ndarray:
    """The clean domain: an unchanged copy."""
    _check(images)
    return images.copy()


def greyscale(images: np.ndarray, seed: int) -> np.ndarray:
    """BT.601 luma, repeated in all three channels (the model still takes RGB). No randomness:
    ``seed`` is accepted for a uniform signature."""
    _check(images)
    luma = np.rint(images.astype(np.float32) @ LUMA).clip(0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1)


def low_light(images: np.ndarray, seed: int) -> np.ndarray:
    """Under-exposure: ``255 * b * (x / 255) ** gamma`` with a per-image brightness ``b``."""
    _check(images)
    b = np.random.default_rng(seed).uniform(*LOW_LIGHT_BRIGHTNESS, size=(len(images), 1, 1, 1))
    out = 255.0 * b * (images.astype(np.float32) / 255.0) ** LOW_LIGHT_GAMMA
    return np.rint(out).clip(0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, seed: int) -> np.ndarray:
    """Defocus: Pillow's Gaussian blur with a per-image standard deviation (scaled to the image size)."""
    _check(images)
    scale = images.shape[1] / 32.0
    sigmas = np.random.default_rng(seed).uniform(*BLUR_SIGMA_AT_32PX, size=len(images)) * scale
    out = np.empty_like(images)
    for i, (img, sigma) in enumerate(zip(images, sigmas, strict=True)):
        out[i] = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=float(sigma))))
    return out


def jpeg_artefacts(images: np.ndarray, seed: int) -> np.ndarray:
    """A low-quality JPEG re-encode with Pillow (4:2:0 chroma), per-image quality."""
    _check(images)
    qualities = np.random.default_rng(seed).integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, size=len(images))
    out = np.empty_like(images)
    for i, (img, q) in enumerate(zip(images, qualities, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(q))
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


SHIFTS: dict[str, Shift] = {
    "clean": identity,
    "greyscale": greyscale,
    "low-light": low_light,
    "blur": gaussian_blur,
    "jpeg": jpeg_artefacts,
}
PARTS = ("train", "test")


def domain_seed(index: int, part: str) -> int:
    """The fixed seed of domain ``index``'s ``part`` (train or test): part of the protocol's data
    definition, independent of the run seed, so methods and seeds are compared on the same pixels."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    return 1000 * index + PARTS.index(part)


def apply_domain(name: str, images: np.ndarray, index: int, part: str) -> np.ndarray:
    """Domain ``name`` (position ``index`` in its protocol) applied to a split's images."""
    if name not in SHIFTS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(SHIFTS)}")
    return SHIFTS[name](images, domain_seed(index, part))
