"""Labelled image sets: reading an update folder, holding out validation slices.

An update folder holds one sub-folder per class (the class name, or its slug from
:func:`cvm_edge.concepts.slugify`, e.g. ``t-shirt-top`` for "T-shirt/top"), or a ``labels.csv``
with ``path,label`` rows (paths relative to the folder).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cvm_edge.concepts import ConceptTable, slugify
from cvm_edge.errors import DataError
from cvm_edge.preprocess import Preprocessing, load_pixels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """uint8 NHWC pixels at the model's size with table-row labels."""

    pixels: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.pixels) != len(self.labels):
            raise ValueError("pixels and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[int]:
        return sorted({int(c) for c in self.labels})

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(self.pixels[idx], self.labels[idx])

    @staticmethod
    def concat(sets: Sequence[ImageSet], image_size: int) -> ImageSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            return ImageSet(np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0,), np.int64))
        return ImageSet(np.concatenate([s.pixels for s in sets]), np.concatenate([s.labels for s in sets]))


def _unknown_class_error(unknown: Sequence[str], table_hint: str) -> DataError:
    names = ", ".join(repr(u) for u in unknown)
    return DataError(
        f"class(es) {names} are not in the concept table; add them with "
        f"`cvm embed extend --table {table_hint} --classes NEW.txt --out NEW_TABLE.npz` and pass "
        "`--concepts NEW_TABLE.npz` to `cvm update`"
    )


def list_labelled_files(data_dir: Path, table: ConceptTable, table_hint: str = "TABLE.npz") -> list[tuple[Path, int]]:
    """(file, table row) pairs from a class-folder tree or a ``labels.csv``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    root = data_dir.resolve()
    pairs: list[tuple[Path, int]] = []
    unknown: list[str] = []
    csv_path = data_dir / "labels.csv"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"{csv_path} needs a header with columns path,label")
            for line, row in enumerate(reader, start=2):
                rel, label = (row["path"] or "").strip(), (row["label"] or "").strip()
                if "\x00" in rel or "\x00" in label:
                    raise DataError(f"{csv_path}:{line}: a NUL byte in the path or label")
                path = (data_dir / rel).resolve()
                if not rel or root not in path.parents:
                    raise DataError(f"{csv_path}:{line}: path {rel!r} is empty or outside the data folder")
                cls = table.lookup(label)
                if cls is None:
                    unknown.append(label)
                    continue
                pairs.append((path, cls))
    else:
        for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            cls = table.lookup(sub.name)
            if cls is None:
                unknown.append(sub.name)
                continue
            files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            pairs.extend((f, cls) for f in files)
    if unknown:
        raise _unknown_class_error(sorted(set(unknown)), table_hint)
    if not pairs:
        raise DataError(f"{data_dir} holds no class folders with images and no labels.csv")
    return pairs


def load_image_folder(
    data_dir: Path,
    table: ConceptTable,
    prep: Preprocessing,
    skip_bad: bool = False,
    table_hint: str = "TABLE.npz",
) -> ImageSet:
    """Decode every image of an update folder. Unreadable files are listed in one error,
    or skipped with a warning each when ``skip_bad``."""
    pairs = list_labelled_files(data_dir, table, table_hint)
    # One preallocated array instead of a list then np.stack: half the peak memory for big folders.
    pixels = np.empty((len(pairs), prep.image_size, prep.image_size, 3), np.uint8)
    labels: list[int] = []
    bad: list[str] = []
    for path, cls in tqdm(pairs, desc="reading images", unit="img", leave=False):
        try:
            pixels[len(labels)] = load_pixels(path.read_bytes(), prep)
            labels.append(cls)
        except (DataError, OSError) as exc:
            bad.append(f"{path} ({exc})")
            if skip_bad:
                log.warning("skipping unreadable image %s: %s", path, exc)
    if bad and not skip_bad:
        listed = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{len(bad)} unreadable image(s): {listed}. Fix or remove them, or pass --skip-bad-images")
    if not labels:
        raise DataError(f"no readable images in {data_dir}")
    return ImageSet(pixels[: len(labels)], np.asarray(labels, dtype=np.int64))


def holdout_split(data: ImageSet, fraction: float, seed: int, max_per_class: int = 100) -> tuple[ImageSet, ImageSet]:
    """Seeded per-class split into (train, validation). Every class keeps at least one training
    image and, when it has two or more, gives at least one to validation."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in data.classes:
        idx = np.flatnonzero(data.labels == cls)
        rng.shuffle(idx)
        n_val = min(max_per_class, round(len(idx) * fraction))
        n_val = max(1, n_val) if len(idx) >= 2 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return data.subset(np.sort(np.concatenate(train_idx))), data.subset(np.sort(np.concatenate(val_idx)))


def folder_name_for(name: str) -> str:
    """The folder a class's images go in when written by our own tools (always the slug)."""
    return slugify(name)
