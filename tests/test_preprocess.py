from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cvm_edge.errors import DataError
from cvm_edge.preprocess import ImageTooLargeError, Preprocessing, UnsupportedImageError, load_pixels, normalise

PREP = Preprocessing(image_size=32)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "RGB", "I;16"])
def test_modes_become_rgb(mode: str) -> None:
    img = Image.new(mode, (40, 20))
    px = load_pixels(_encode(img), PREP)
    assert px.shape == (32, 32, 3) and px.dtype == np.uint8


def test_16_bit_scales_to_8_bit() -> None:
    arr = np.full((10, 10), 65535, np.uint16)
    px = load_pixels(_encode(Image.fromarray(arr)), PREP)
    assert px.min() == 255


def test_centre_crop_of_wide_image() -> None:
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 200  # the centre third is bright
    px = load_pixels(_encode(Image.fromarray(arr)), PREP)
    assert px.mean() > 190


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="empty"):
        load_pixels(b"", PREP)
    with pytest.raises(UnsupportedImageError):
        load_pixels(b"hello world", PREP)
    png = _encode(Image.new("RGB", (64, 64), "red"))
    with pytest.raises(DataError):
        load_pixels(png[: len(png) // 2], PREP)
    with pytest.raises(ImageTooLargeError):
        load_pixels(_encode(Image.new("L", (3000, 3000))), PREP, max_pixels=1_000_000)


def test_normalise_matches_formula() -> None:
    px = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    prep = Preprocessing(32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    x = normalise(px, prep)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    assert np.isclose(x[1, 2, 5, 7], (px[1, 5, 7, 2] / 255 - 0.3) / 0.7, atol=1e-6)
