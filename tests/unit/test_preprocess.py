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


def test_normalise_is_bit_identical_to_the_training_side() -> None:
    import torch

    from cvm_edge.augment import to_input

    px = np.random.default_rng(1).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    prep = Preprocessing(24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = normalise(px, prep)
    assert x.flags.c_contiguous
    assert np.array_equal(x, to_input(torch.from_numpy(px), prep).numpy())
    expected = (
        (px.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)) - np.float32(prep.mean).reshape(1, 3, 1, 1)
    ) / np.float32(prep.std).reshape(1, 3, 1, 1)
    assert np.array_equal(x, expected)
    assert np.array_equal(normalise(px[0], prep), x[:1])


def _photo(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def test_large_jpeg_is_drafted_only_when_the_preprocessing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_photo(1600, 1200), "JPEG")
    from PIL.JpegImagePlugin import JpegImageFile

    drafted = []
    real_draft = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        out = real_draft(self, mode, size)
        drafted.append(self.size)
        return out

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    new, old = Preprocessing(32), Preprocessing(32, jpeg_draft=False)
    a, b = load_pixels(data, new), load_pixels(data, old)
    assert drafted == [(200, 150)]  # 1/8 scale still holds twice the 43x32 resize
    assert a.shape == b.shape == (32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2  # the same picture


def test_records_without_the_draft_field_keep_the_full_decode() -> None:
    d = Preprocessing(224).to_dict()
    assert d["jpeg_draft"] is True and Preprocessing.from_dict(d) == Preprocessing(224)
    del d["jpeg_draft"]
    assert Preprocessing.from_dict(d).jpeg_draft is False


def test_small_images_decode_the_same_with_or_without_draft() -> None:
    data = _encode(_photo(48, 40), "JPEG")
    assert np.array_equal(load_pixels(data, Preprocessing(32)), load_pixels(data, Preprocessing(32, jpeg_draft=False)))
