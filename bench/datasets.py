"""Benchmark datasets: packed npz files of ``../shared/data``, ImageFolder trees, the embedded sample.

Everything is decoded once into uint8 RGB arrays (N, S, S, 3) at the protocol's image size and
cached as ``.npy`` files under :func:`cache_dir`, so a grid of runs decodes each dataset once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TEST_SPLIT_NAMES = ("test", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def data_root() -> Path | None:
    """``$CVM_BENCH_DATA``, else ``../shared/data`` beside the checkout, else ``.devdata/data``."""
    env = os.environ.get("CVM_BENCH_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / ".devdata" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def cache_dir() -> Path:
    d = Path(os.environ.get("CVM_BENCH_CACHE", Path.home() / ".cache" / "cvm-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx])


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split


def to_rgb_size(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> (N, size, size, 3): grey is repeated, other sizes resized (bicubic)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images, dtype=np.uint8)
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return out


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(offsets) - 1, size, size, 3), np.uint8)
    for i in range(len(offsets) - 1):
        img = Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)
    return out


def load_npz_split(path: Path, size: int) -> Split:
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"].astype(np.int64)
        if "jpeg" in z.files:
            images = _decode_jpegs(z["jpeg"], z["offsets"], size)
        else:
            images = to_rgb_size(z["images"], size)
    return Split(images, labels)


def _load_folder_split(root: Path, classes: Sequence[str], size: int) -> Split:
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                img = Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
                images.append(np.asarray(img))
                labels.append(c)
    return Split(np.stack(images), np.asarray(labels, np.int64))


def _cached(key: str, build: Callable[[], tuple[Split, Split]]) -> tuple[Split, Split]:
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Split(z["xtr"], z["ytr"]), Split(z["xte"], z["yte"])
    train, test = build()
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, xtr=train.images, ytr=train.labels, xte=test.images, yte=test.labels)
    tmp.replace(path)
    return train, test


def load_dataset(name_or_path: str, size: int) -> Dataset:
    """A dataset by name (a folder of :func:`data_root` with ``classes.json`` and ``train.npz`` plus
    ``test.npz`` or ``val.npz``), by path to such a folder, or by path to an ImageFolder tree
    (``train/<class>/*`` and ``test/<class>/*``)."""
    if name_or_path == "demo":
        return demo_dataset(size)
    path = Path(name_or_path)
    if not path.is_dir():
        root = data_root()
        if root is None or not (root / name_or_path).is_dir():
            raise FileNotFoundError(f"dataset {name_or_path!r} not found (data root {root})")
        path = root / name_or_path
    key_src = f"{path.resolve()}|{size}"
    key = f"{path.name}-{size}-{hashlib.sha1(key_src.encode()).hexdigest()[:8]}"
    if (path / "train.npz").is_file():
        classes = tuple(json.loads((path / "classes.json").read_text()))
        test_file = next(path / f"{t}.npz" for t in TEST_SPLIT_NAMES if (path / f"{t}.npz").is_file())
        train, test = _cached(key, lambda: (load_npz_split(path / "train.npz", size), load_npz_split(test_file, size)))
    elif (path / "train").is_dir() and (path / "test").is_dir():
        classes = tuple(sorted(p.name for p in (path / "train").iterdir() if p.is_dir()))
        train, test = _cached(
            key,
            lambda: (
                _load_folder_split(path / "train", classes, size),
                _load_folder_split(path / "test", classes, size),
            ),
        )
    else:
        raise FileNotFoundError(f"{path} is neither a packed-npz dataset folder nor a train/ test/ ImageFolder tree")
    return Dataset(path.name, classes, train, test)


def demo_dataset(size: int) -> Dataset:
    """The Fashion-MNIST sample embedded in the package (300 train / 60 test images per class)."""
    from cvm_edge.demo import load_sample

    s = load_sample()
    train = Split(to_rgb_size(s["train_images"], size), s["train_labels"].astype(np.int64))
    test = Split(to_rgb_size(s["test_images"], size), s["test_labels"].astype(np.int64))
    return Dataset("fashion_mnist_sample", tuple(str(c) for c in s["classes"]), train, test)


def first_per_class_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in file order (seed-independent:
    part of a protocol's data definition, so every seed sees the same images)."""
    keep = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)


def per_class_subset(split: Split, per_class: int, seed: int) -> Split:
    """At most ``per_class`` images of every class, chosen with a seed."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        keep.append(np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)))
    return split.take(np.concatenate(keep))
