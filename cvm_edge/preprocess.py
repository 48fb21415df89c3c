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
        )


def open_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] = SUPPORTED_FORMATS
) -> Image.Image:
    """Decode encoded image bytes into an RGB Pillow image, with size and format checks first."""
    if not data:
        raise DataError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"not a supported image ({', '.join(formats)})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLargeError("image dimensions are too large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise DataError(f"cannot decode image: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise ImageTooLargeError(f"image is {w}x{h}, over the limit of {max_pixels} pixels")
    try:
        img.load()
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise DataError(f"cannot decode image: {exc}") from None


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
    return img.convert("RGB")


def resize_crop(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB image -> uint8 HWC array of ``image_size`` x ``image_size``."""
    size = prep.image_size
    target = max(size, round(size / prep.crop_pct))
    w, h = img.size
    scale = target / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _INTERPOLATION[prep.interpolation])
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def load_pixels(data: bytes, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 HWC array ready for :func:`normalise`."""
    return resize_crop(open_image(data, max_pixels=max_pixels), prep)


def array_to_pixels(arr: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A uint8 HW, HWC (1 or 3 channel) array -> uint8 HWC at the model's size."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise DataError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    img = Image.fromarray(a).convert("RGB")
    return resize_crop(img, prep)


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 NHWC (or HWC) -> float32 NCHW normalised input."""
    x = np.asarray(pixels)
    if x.ndim == 3:
        x = x[None]
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(1, 3, 1, 1)
    chw = x.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray((chw - mean) / std)
