"""Image decoding for the server under hostile input.

Every limit is checked on the header (Pillow's ``Image.open`` reads the declared size, mode and
codec, and allocates no pixels) before any image of a request is decoded:

- each image: the pixel limit, an aspect-ratio limit, and a smaller pixel limit for images that
  Pillow decodes in Python (BMP RLE: about 0.5 us a pixel holding the GIL; one decoded at a time);
- each request: the declared pixels of all its images together;
- all requests: the estimated decode memory of the images being decoded at once shares one budget
  (:class:`MemoryBudget`); an image whose estimate alone is over the budget is refused.

The decode itself is the training-side preprocessing (``cvm_edge.preprocess``), unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import Image

from cvm_edge.errors import CvmError, DataError
from cvm_edge.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    Preprocessing,
    UnsupportedImageError,
    check_pixels,
    decode_probed,
    draft_jpeg,
    probe_image,
    resize_crop,
)


class BadAspectError(DataError):
    http_status = 422


# Peak bytes per pixel of a decode to RGB, measured on 6000 x 6000 images with Pillow 13 (ru_maxrss):
# RGB PNG/JPEG 4.1 (Pillow keeps RGB in 4 bytes), RGBA 8.1, palette 9.1, 16-bit grey 26 (float64
# arrays in _to_rgb), WebP 16.1 (libwebp's buffer, Pillow's copy, then the RGB conversion).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "RGB": 4, "RGBA": 4, "CMYK": 4}
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
_WEBP_BYTES_PER_PIXEL = 17


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # one image, declared size
    max_request_pixels: int = 120_000_000  # all images of one request, declared sizes
    max_aspect_ratio: float = 100.0  # longer side / shorter side
    max_slow_decode_pixels: int = 262_144  # images Pillow decodes in Python (BMP RLE): 512 x 512
    memory_bytes: int = 320 << 20  # estimated decode memory of every image being decoded at once

    def __post_init__(self) -> None:
        if min(self.max_pixels, self.max_request_pixels, self.max_slow_decode_pixels, self.memory_bytes) < 1:
            raise ValueError("decode limits must be positive")
        if not self.max_aspect_ratio >= 1:
            raise ValueError("max_aspect_ratio must be at least 1")


def decode_cost_bytes(img: Image.Image) -> int:
    """Estimated peak memory of decoding ``img`` (opened, not loaded) to RGB."""
    w, h = img.size
    if img.format == "WEBP":
        per_pixel = _WEBP_BYTES_PER_PIXEL
    elif img.mode in _DEEP_MODES:
        per_pixel = 28
    else:
        per_pixel = _MODE_BYTES.get(img.mode, 4)
        if img.mode != "RGB":
            per_pixel += 4 + (4 if img.mode == "P" else 0)  # the RGB copy (P goes through RGBA)
    return w * h * per_pixel + (1 << 20)


class MemoryBudget:
    """Bytes shared by the decodes in flight: :meth:`reserve` waits until its share is free."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self.peak = 0  # the most ever reserved at once (tests and benchmarks read it)
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        if n > self.total:
            raise ValueError(f"{n} bytes is more than the whole budget of {self.total}")
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + n <= self.total)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()


def _is_python_decoded(img: Image.Image) -> bool:
    return any(tile.codec_name in Image.DECODERS for tile in getattr(img, "tile", ()))


class ImageDecoder:
    """Checks and decodes the images of requests under :class:`DecodeLimits` (one per app)."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.budget = MemoryBudget(limits.memory_bytes)
        # Python-decoded images hold the GIL for their whole decode: one at a time, so that the
        # event loop (health, metrics) competes with at most one such thread for it.
        self.python_decodes = threading.Semaphore(1)

    def probe(self, data: bytes, prep: Preprocessing) -> tuple[Image.Image, int]:
        """The opened image and its estimated decode cost; every per-image limit checked."""
        lim = self.limits
        img = probe_image(data)
        check_pixels(img, lim.max_pixels)
        w, h = img.size
        if max(w, h) > lim.max_aspect_ratio * min(w, h):
            raise BadAspectError(
                f"image is {w}x{h}: an aspect ratio over {lim.max_aspect_ratio:g}:1 is not an image this model can use"
            )
        if _is_python_decoded(img) and w * h > lim.max_slow_decode_pixels:
            raise UnsupportedImageError(
                f"{img.format} with this compression ({w}x{h}) is decoded slowly; only up to "
                f"{lim.max_slow_decode_pixels} pixels are accepted: send PNG, JPEG or WebP"
            )
        draft_jpeg(img, prep)  # the cost of what will really be decoded
        cost = decode_cost_bytes(img)
        if cost > self.budget.total:
            raise ImageTooLargeError(
                f"image is {w}x{h} {img.format} ({img.mode}): decoding it needs about {cost >> 20} MiB, "
                f"over the server's decode memory of {self.budget.total >> 20} MiB"
            )
        return img, cost

    def decode_all(self, images: Sequence[tuple[str | None, bytes]], prep: Preprocessing) -> np.ndarray:
        """uint8 NHWC pixels of every image, in order. All headers are checked before the first
        decode; then each image is decoded inside its share of the memory budget."""
        probed = []
        total = 0
        for i, (name, data) in enumerate(images):
            with _labelled(i, name, len(images)):
                img, cost = self.probe(data, prep)
            probed.append((i, name, img, cost))
            total += img.size[0] * img.size[1]  # JPEG drafting may have reduced it: count what is decoded
        if total > self.limits.max_request_pixels:
            raise ImageTooLargeError(
                f"the request's images hold {total} pixels together, over the limit of "
                f"{self.limits.max_request_pixels} per request"
            )
        pixels = []
        for i, name, img, cost in probed:
            slow = self.python_decodes if _is_python_decoded(img) else contextlib.nullcontext()
            with _labelled(i, name, len(images)), self.budget.reserve(cost), slow:
                pixels.append(_decode(img, prep))
        return np.stack(pixels)


def _decode(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    try:
        return resize_crop(decode_probed(img), prep)  # drafted in probe()
    except CvmError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's resize raises untyped errors on odd sizes
        raise DataError(f"cannot decode image: {exc}") from None


@contextmanager
def _labelled(i: int, name: str | None, n: int) -> Iterator[None]:
    """Name the image in an error when the request has several."""
    try:
        yield
    except CvmError as exc:
        if n > 1:
            exc.args = (f"file {i + 1} ({name or 'unnamed'}): {exc}",)
        raise
