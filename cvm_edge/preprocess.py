"""Image decoding and preprocessing shared by training, export and serving (numpy + Pillow only).

One implementation on both sides is what makes server answers match the trained model.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cvm_edge.errors import DataError

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard: a 40 MP frame is beyond any camera we target
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# The largest intermediate image of a resize (resize_crop): 4 MP is 16 MB of RGB, beyond what any
# normal image needs (a 10:1 panorama at 224 px resizes to 2240 x 224 = 0.5 MP).
MAX_RESIZE_PIXELS = 4_000_000
DRAFT_GAP = 2  # a drafted JPEG keeps at least this many times the resized size (Pillow's thumbnail rule)
_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageTooLargeError(DataError):
    http_status = 413


class UnsupportedImageError(DataError):
    http_status = 415


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How pixels become a model input: resize the shorter side to ``image_size / crop_pct``,
    centre-crop ``image_size``, scale to [0, 1], subtract ``mean``, divide by ``std``."""

    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    # Decode a JPEG much larger than needed at 1/2, 1/4 or 1/8 scale (see draft_jpeg). Part of the
    # recorded preprocessing so training and serving of one checkpoint always agree; records made
    # before it existed read as False and keep the full-size decode they were trained with.
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError("crop_pct must be in [0.1, 1]")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Preprocessing:
        return cls(
            image_size=int(d["image_size"]),  # type: ignore[call-overload]
            mean=tuple(d["mean"]),  # type: ignore[arg-type]
            std=tuple(d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
            crop_pct=float(d.get("crop_pct", 1.0)),  # type: ignore[arg-type]
            jpeg_draft=bool(d.get("jpeg_draft", False)),
        )


def probe_image(data: bytes, formats: Sequence[str] = SUPPORTED_FORMATS) -> Image.Image:
    """Open encoded image bytes without decoding them: Pillow reads the header only, so the
    declared size, mode and codec can be checked before any pixel buffer exists."""
    if not data:
        raise DataError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"not a supported image ({', '.join(formats)})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLargeError("image dimensions are too large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise DataError(f"cannot decode image: {exc}") from None


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """413 when the declared size is empty or over ``max_pixels`` (header only, nothing decoded)."""
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise ImageTooLargeError(f"image is {w}x{h}, over the limit of {max_pixels} pixels")


def decode_probed(img: Image.Image, prep: Preprocessing | None = None) -> Image.Image:
    """Decode an image from :func:`probe_image` into RGB (drafting a large JPEG first, see
    :func:`open_image`)."""
    try:
        if prep is not None:
            draft_jpeg(img, prep)
        img.load()
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise DataError(f"cannot decode image: {exc}") from None


def open_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = SUPPORTED_FORMATS,
    prep: Preprocessing | None = None,
) -> Image.Image:
    """Decode encoded image bytes into an RGB Pillow image, with size and format checks first.

    With ``prep`` (and ``prep.jpeg_draft``), a JPEG much larger than the model's input is decoded at
    a reduced scale (:func:`draft_jpeg`): several times faster, and it keeps at least ``DRAFT_GAP``
    times the pixels the resize needs."""
    img = probe_image(data, formats)
    check_pixels(img, max_pixels)
    return decode_probed(img, prep)


def resized_size(w: int, h: int, prep: Preprocessing) -> tuple[int, int]:
    """The size a ``w`` x ``h`` image is resized to before the centre crop: shorter side
    ``image_size / crop_pct``, never below ``image_size``."""
    size = prep.image_size
    target = max(size, round(size / prep.crop_pct))
    scale = target / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def draft_jpeg(img: Image.Image, prep: Preprocessing) -> None:
    """Before ``load()``: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling),
    keeping at least ``DRAFT_GAP`` times the resized size, so the resize that follows still filters
    (the same rule as Pillow's ``thumbnail``). No-op for other formats and small images."""
    if not prep.jpeg_draft or img.format != "JPEG":
        return
    nw, nh = resized_size(*img.size, prep)
    img.draft(None, (nw * DRAFT_GAP, nh * DRAFT_GAP))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_crop(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB image -> uint8 HWC array of ``image_size`` x ``image_size`` (one resize, one crop).

    When the resized image would be larger than ``MAX_RESIZE_PIXELS`` (an extreme aspect ratio:
    a 1 x 200,000 strip resizes to 32 x 6.4 M), the crop is computed first, in source coordinates,
    and only that box is resized: same geometry, bounded memory. Images below the bound keep the
    resize-then-crop they were trained with, bit for bit."""
    size = prep.image_size
    w, h = img.size
    nw, nh = resized_size(w, h, prep)
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh > MAX_RESIZE_PIXELS:
        sx, sy = w / nw, h / nh  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return np.asarray(img.resize((size, size), _INTERPOLATION[prep.interpolation], box=box), dtype=np.uint8)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _INTERPOLATION[prep.interpolation])
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def load_pixels(data: bytes, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 HWC array ready for :func:`normalise` (decode once, at a reduced
    scale when the JPEG is much larger than needed; resize and crop once)."""
    return resize_crop(open_image(data, max_pixels=max_pixels, prep=prep), prep)


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 NHWC (or HWC) -> float32 NCHW normalised input: ``(x / 255 - mean) / std``.

    One float32 buffer, converted into by a strided copy and then updated in place: the same
    float32 operations in the same order as ``cvm_edge.augment.to_input`` (bit-identical to the
    expression), without the temporaries, about five times faster at 224 px."""
    x = np.asarray(pixels)
    if x.ndim == 3:
        x = x[None]
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(1, 3, 1, 1)
    n, h, w, _ = x.shape
    out = np.empty((n, 3, h, w), np.float32)
    np.copyto(out, x.transpose(0, 3, 1, 2), casting="unsafe")
    out *= np.float32(1.0 / 255.0)
    out -= mean
    out /= std
    return out
