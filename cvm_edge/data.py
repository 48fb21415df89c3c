"""Labelled image sets: reading an update folder, holding out validation slices.

An update folder holds one sub-folder per class (the class name, or its slug from
:func:`cvm_edge.concepts.slugify`, e.g. ``t-shirt-top`` for "T-shirt/top"), or a ``labels.csv``
with ``path,label`` rows (paths relative to the folder).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from cvm_edge.concepts import ConceptTable
from cvm_edge.errors import DataError
from cvm_edge.fsutil import MAX_IMAGE_BYTES, MAX_SMALL_FILE_BYTES, read_regular
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


def _inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved (links followed), refused unless it stays inside ``root``: the one rule for
    folder mode and ``labels.csv`` alike, so no data folder can make an update read files elsewhere."""
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise DataError(f"{what} leads outside the data folder {root}; refused")
    return resolved


def _read_labels_csv(data_dir: Path, root: Path, table: ConceptTable, unknown: list[str]) -> list[tuple[Path, int]]:
    csv_path = data_dir / "labels.csv"
    _inside(root, csv_path, str(csv_path))
    try:
        # utf-8-sig: Excel and Windows Notepad save "CSV UTF-8" with a byte-order mark in front of the header
        text = read_regular(csv_path, MAX_SMALL_FILE_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path} is not UTF-8 text (byte {exc.start}); save it as CSV UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {csv_path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise DataError(f"{csv_path} needs a header with columns path,label")
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    pairs: list[tuple[Path, int]] = []
    first_seen: dict[Path, tuple[int, str, int]] = {}  # resolved path -> (line, label, row)
    for line, row in enumerate(reader, start=2):
        rel, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        if "\x00" in rel or "\x00" in label:
            raise DataError(f"{csv_path}:{line}: a NUL byte in the path or label")
        if not rel:
            raise DataError(f"{csv_path}:{line}: the path is empty")
        path = _inside(root, data_dir / rel, f"{csv_path}:{line}: path {rel[:200]!r}")
        cls = table.lookup(label)
        if cls is None:
            unknown.append(label)
            continue
        if path in first_seen:
            seen_line, seen_label, seen_cls = first_seen[path]
            if seen_cls != cls:
                raise DataError(
                    f"{csv_path}:{line}: {rel[:200]!r} is labelled {label!r}, but line {seen_line} labels the same "
                    f"image {seen_label!r}; an image has one label: fix one of the two rows"
                )
            continue  # the same row twice: one image, learned once
        first_seen[path] = (line, label, cls)
        pairs.append((path, cls))
    return pairs


def _read_class_folders(data_dir: Path, root: Path, table: ConceptTable, unknown: list[str]) -> list[tuple[Path, int]]:
    pairs: list[tuple[Path, int]] = []
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        _inside(root, sub, f"class folder {sub}")
        cls = table.lookup(sub.name)
        if cls is None:
            unknown.append(sub.name)
            continue
        files: list[Path] = []
        # followlinks=False: a linked sub-folder is not descended into (as Path.rglob); a linked file
        # is taken only when it resolves inside the data folder
        for dirpath, _dirs, names in os.walk(sub, followlinks=False):
            for name in names:
                f = Path(dirpath) / name
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(_inside(root, f, f"image {f}"))
        files = sorted(f for f in files if f.is_file())
        if not files:
            raise DataError(f"class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        pairs.extend((f, cls) for f in files)
    return pairs


def list_labelled_files(data_dir: Path, table: ConceptTable, table_hint: str = "TABLE.npz") -> list[tuple[Path, int]]:
    """(file, table row) pairs from a class-folder tree or a ``labels.csv``. Every file, followed
    through links, must lie inside ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    root = data_dir.resolve()
    unknown: list[str] = []
    if (data_dir / "labels.csv").exists() or (data_dir / "labels.csv").is_symlink():
        pairs = _read_labels_csv(data_dir, root, table, unknown)
    else:
        pairs = _read_class_folders(data_dir, root, table, unknown)
    if unknown:
        raise _unknown_class_error(sorted(set(unknown)), table_hint)
    if not pairs:
        raise DataError(f"{data_dir} holds no class folders with images and no labels.csv")
    return pairs


def decode_labelled(
    pairs: Sequence[tuple[Path, int]], prep: Preprocessing, skip_bad: bool, progress: bool
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Each file of ``pairs`` decoded to uint8 HWC pixels at the model's size, in order:
    ``(index, pixels, None)``, or ``(index, None, "path (reason)")`` for an unreadable one (logged
    as skipped when ``skip_bad``). Only regular files of at most ``MAX_IMAGE_BYTES`` are opened (a
    FIFO or a huge sparse file is an unreadable image)."""
    for i, (path, _cls) in enumerate(tqdm(pairs, desc="reading images", unit="img", leave=False, disable=not progress)):
        try:
            yield i, load_pixels(read_regular(path, MAX_IMAGE_BYTES), prep), None
        except (DataError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            if skip_bad:
                log.warning("skipping unreadable image %s: %s", path, reason)
            yield i, None, f"{path} ({reason})"


def check_readable(bad: Sequence[str], n_good: int, data_dir: Path, skip_bad: bool) -> None:
    """The error for unreadable images (all listed in one message) or for a folder with none readable."""
    if bad and not skip_bad:
        listed = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{len(bad)} unreadable image(s): {listed}. Fix or remove them, or pass --skip-bad-images")
    if not n_good:
        raise DataError(f"no readable images in {data_dir}")


def load_image_folder(
    data_dir: Path,
    table: ConceptTable,
    prep: Preprocessing,
    skip_bad: bool = False,
    table_hint: str = "TABLE.npz",
    progress: bool = True,
) -> ImageSet:
    """Decode every image of an update folder. Unreadable files are listed in one error,
    or skipped with a warning each when ``skip_bad`` (:func:`decode_labelled`)."""
    pairs = list_labelled_files(data_dir, table, table_hint)
    # One preallocated array instead of a list then np.stack: half the peak memory for big folders.
    pixels = np.empty((len(pairs), prep.image_size, prep.image_size, 3), np.uint8)
    labels: list[int] = []
    bad: list[str] = []
    for i, px, reason in decode_labelled(pairs, prep, skip_bad, progress):
        if px is None:
            bad.append(str(reason))
            continue
        pixels[len(labels)] = px
        labels.append(pairs[i][1])
    check_readable(bad, len(labels), data_dir, skip_bad)
    return ImageSet(pixels[: len(labels)], np.asarray(labels, dtype=np.int64))


class Labelled(Protocol):
    """A labelled set that :func:`holdout_split` can split: images (:class:`ImageSet`) or their features."""

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def classes(self) -> list[int]: ...

    def subset(self: _L, idx: np.ndarray) -> _L: ...


_L = TypeVar("_L", bound=Labelled)


def holdout_indices(
    labels: np.ndarray, fraction: float, seed: int, max_per_class: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices of a seeded per-class split. Every class keeps at least
    one training image and, when it has two or more, gives at least one to validation."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in sorted({int(c) for c in labels}):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = min(max_per_class, round(len(idx) * fraction))
        n_val = max(1, n_val) if len(idx) >= 2 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def holdout_split(data: _L, fraction: float, seed: int, max_per_class: int = 100) -> tuple[_L, _L]:
    """``data`` split by :func:`holdout_indices` into (train, validation)."""
    train_idx, val_idx = holdout_indices(data.labels, fraction, seed, max_per_class)
    return data.subset(train_idx), data.subset(val_idx)


def content_holdout_indices(
    keys: Sequence[bytes], labels: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices where each image's side is a function of its own content:
    held out when its sha256 falls in the lowest ``fraction`` of the hash range. A folder that keeps
    growing (a fleet device retrains on all its images every round) then never moves an image it held
    out into training, which a seeded split of the grown folder would. A class of two or more images
    whose hashes all miss the range holds out its lowest-hashed one (stable until a lower one arrives);
    no per-class cap, which would move images as a class grows."""
    u = np.asarray([int.from_bytes(hashlib.sha256(k).digest()[:8], "big") / 2.0**64 for k in keys])
    val = u < fraction
    for cls in {int(c) for c in labels}:
        idx = np.flatnonzero(labels == cls)
        if len(idx) >= 2 and not val[idx].any():
            val[idx[np.argmin(u[idx])]] = True
        if val[idx].all():  # every class keeps a training image
            val[idx[np.argmax(u[idx])]] = False
    return np.flatnonzero(~val), np.flatnonzero(val)
