"""Shared pieces of the deployment tests (no tests here): a small trained store, a real server
process, and generated images in the formats the server must take."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FASHION_NAMES, SHARED_DATA, init_store, run_cli
from cvm_edge.demo import load_sample, write_class_folders

PHOTOS = SHARED_DATA / "photos"
ADMIN_TOKEN = "test-admin-token-4f1c"
_TEMPLATE: dict[str, Path] = {}


def write_folders(root: Path, classes: list[int], per_class: int) -> Path:
    s = load_sample()
    images, labels = s["train_images"], s["train_labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    return write_class_folders(root, images[keep], labels[keep], FASHION_NAMES, classes)


def update(workdir: Path, data: Path, *extra: str) -> int:
    return run_cli("-q", "update", "--workdir", str(workdir), "--data", str(data), "--no-progress", *extra)


def trained_store(tmp_path_factory: pytest.TempPathFactory, table: Path, dest: Path) -> Path:
    """A copy of one small trained store: the demo backbone (resnet10_cifar_slim, 32 px), two classes
    (T-shirt/top, Trouser; 60 images each, 2 epochs), checkpoint v2 and the fp32 bundle v000002
    that `cvm update` exported and published. Built once per session."""
    if "store" not in _TEMPLATE:
        base = tmp_path_factory.mktemp("deploy-template")
        wd = base / "w"
        init_store(wd, table)
        assert update(wd, write_folders(base / "data", [0, 1], 60), "--epochs", "2") == 0
        _TEMPLATE["store"] = wd
    shutil.copytree(_TEMPLATE["store"], dest)
    return dest


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def generated_images() -> dict[str, tuple[bytes, str]]:
    """Synthetic images in every format and mode the server must accept: name -> (bytes, content type)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB")
    gray = rgb.convert("L")
    deep = Image.fromarray((rng.integers(0, 65536, (40, 40))).astype(np.uint16))  # 16-bit grayscale
    assert deep.mode.startswith("I;16")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)))
    return {
        "rgb.jpg": (encode(rgb, "JPEG", quality=90), "image/jpeg"),
        "gray.jpg": (encode(gray, "JPEG"), "image/jpeg"),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
        "rgb.png": (encode(rgb, "PNG"), "image/png"),
        "gray.png": (encode(gray, "PNG"), "image/png"),
        "gray-alpha.png": (encode(gray.convert("LA"), "PNG"), "image/png"),
        "rgba.png": (encode(rgba, "PNG"), "image/png"),
        "palette.png": (encode(rgb.convert("P"), "PNG"), "image/png"),
        "16bit.png": (encode(deep, "PNG"), "image/png"),
        "bilevel.png": (encode(gray.convert("1"), "PNG"), "image/png"),
        "rgb.webp": (encode(rgb, "WEBP", quality=80), "image/webp"),
        "rgba.webp": (encode(rgba, "WEBP", lossless=True), "image/webp"),
        "rgb.bmp": (encode(rgb, "BMP"), "image/bmp"),
        "tiny.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "image/png"),
        "tall.png": (encode(rgb.resize((12, 300)), "PNG"), "image/png"),
        "large.jpg": (encode(rgb.resize((2400, 1600)), "JPEG"), "image/jpeg"),
        "no-content-type.png": (encode(rgb, "PNG"), "application/octet-stream"),
    }


def photos() -> list[Path]:
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} is absent (the shared data folder is not mounted)")
    files = sorted(PHOTOS.glob("*.jpg"))
    assert len(files) == 300
    return files
