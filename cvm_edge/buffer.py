"""Class-balanced, seeded replay buffer bounded by a sample count and a byte budget.

It holds uint8 pixels at the model's input size with their table-row labels, the experience
(task index) each entry came from and, for DER-style distillation, the logits the model gave them
when they were inserted (on disk the images are PNG: see ``to_bytes``). Updates return a new buffer; nothing is mutated in place.

A class's quota is split evenly over the experiences that brought images of it, so a class
revisited under a new domain (camera, lighting, season) keeps images of every domain seen
instead of being taken over by the newest, most numerous one.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from cvm_edge.data import ImageSet
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import atomic_write_bytes
from cvm_edge.image_codec import decode_images, encode_images


def _quotas(counts: dict[int, int], capacity: int) -> dict[int, int]:
    """Split ``capacity`` evenly over classes; what a small class cannot use goes to the others.
    Left-over single slots go to the lowest class ids, so the split is deterministic."""
    quotas = {c: 0 for c in counts}
    remaining = min(capacity, sum(counts.values()))
    while remaining > 0:
        open_classes = [c for c in sorted(counts) if quotas[c] < counts[c]]
        share, extra = divmod(remaining, len(open_classes))
        for i, c in enumerate(open_classes):
            take = min(share + (1 if i < extra else 0), counts[c] - quotas[c])
            quotas[c] += take
            remaining -= take
    return quotas


def _bytes_per_sample(pixel_shape: tuple[int, ...], logit_width: int) -> int:
    return int(np.prod(pixel_shape)) + 8 + 4 + 2 * max(1, logit_width)  # pixels, label, task tag, logits


@dataclasses.dataclass(frozen=True)
class ReplayBuffer:
    capacity: int
    max_bytes: int
    pixels: np.ndarray  # uint8 [M, S, S, 3]
    labels: np.ndarray  # int64 [M]
    logits: np.ndarray  # float16 [M, C] logits at insertion (C = table rows then), or [M, 0]
    # int32 [M]: the experience (task index) each entry was inserted in; -1 for entries of a buffer
    # file written before entries were tagged (they count as one earlier experience).
    tasks: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.pixels) == len(self.labels) == len(self.logits) == len(self.tasks)):
            raise ValueError("buffer pixels, labels, logits and tasks differ in length")

    @classmethod
    def empty(cls, capacity: int, image_size: int, max_bytes: int = 256 << 20) -> ReplayBuffer:
        if capacity < 0 or max_bytes < 0:
            raise ValueError("buffer capacity and byte budget must be >= 0")
        return cls(
            capacity,
            max_bytes,
            np.zeros((0, image_size, image_size, 3), np.uint8),
            np.zeros((0,), np.int64),
            np.zeros((0, 0), np.float16),
            np.zeros((0,), np.int32),
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes + self.labels.nbytes + self.logits.nbytes + self.tasks.nbytes)

    def sample_bytes(self, logit_width: int) -> int:
        """Bytes one stored sample costs (pixels, label, task tag, float16 logits over ``logit_width`` rows)."""
        return _bytes_per_sample(self.pixels.shape[1:], logit_width)

    def class_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def task_counts(self, cls: int) -> dict[int, int]:
        """Entries of class ``cls`` per experience that brought them."""
        values, counts = np.unique(self.tasks[self.labels == cls], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def updated(self, new: ImageSet, new_logits: np.ndarray | None, seed: int, *, task: int) -> ReplayBuffer:
        """A buffer over old and new classes, rebalanced to equal per-class quotas.

        Old classes keep a seeded subset of what they had (with their recorded logits); new
        classes are sampled from ``new`` (experience ``task``). A class present in both splits its
        quota evenly over the experiences its entries came from (a new domain of a known class).
        """
        return self.updated_with_selection(new, new_logits, seed, task=task)[0]

    def updated_with_selection(
        self, new: ImageSet, new_logits: np.ndarray | None, seed: int, *, task: int
    ) -> tuple[ReplayBuffer, np.ndarray]:
        """:meth:`updated`, plus the kept entries' indices into ``old entries + new samples``.

        The pool is never materialised: entries are gathered from the old buffer and ``new``
        separately, so an update of thousands of 224-px images does not copy them all once more."""
        rng = np.random.default_rng(seed)
        width = max(self.logits.shape[1], new_logits.shape[1] if new_logits is not None else 0)
        pool_labels = np.concatenate([self.labels, new.labels])
        pool_tasks = np.concatenate([self.tasks, np.full(len(new), task, np.int32)])
        counts = {int(c): int((pool_labels == c).sum()) for c in np.unique(pool_labels)}
        cap = min(self.capacity, self.max_bytes // _bytes_per_sample(self.pixels.shape[1:], width))
        quotas = _quotas(counts, cap)
        keep = []
        for cls in sorted(counts):
            idx = np.flatnonzero(pool_labels == cls)
            groups = np.unique(pool_tasks[idx])
            if len(groups) == 1:  # the usual class-incremental case: one draw, as it always was
                keep.append(np.sort(rng.choice(idx, size=quotas[cls], replace=False)))
                continue
            by_task = {int(t): idx[pool_tasks[idx] == t] for t in groups}
            shares = _quotas({t: len(v) for t, v in by_task.items()}, quotas[cls])
            keep += [np.sort(rng.choice(by_task[t], size=shares[t], replace=False)) for t in sorted(by_task)]
        sel = np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)
        old_sel, new_sel = sel[sel < len(self)], sel[sel >= len(self)] - len(self)
        fresh_logits = new_logits if new_logits is not None else np.zeros((len(new), 0), np.float16)
        buffer = dataclasses.replace(
            self,
            pixels=np.concatenate([self.pixels[old_sel], new.pixels[new_sel]]),
            labels=pool_labels[sel],
            logits=np.concatenate([_pad(self.logits[old_sel], width), _pad(fresh_logits[new_sel], width)]),
            tasks=pool_tasks[sel],
        )
        return buffer, sel

    def to_bytes(self) -> bytes:
        """The buffer as an ``.npz``; its images as lossless PNG (cvm_edge.image_codec), not raw pixels."""
        buf = io.BytesIO()
        arrays: dict[str, Any] = {  # Any: numpy's stub types every keyword as allow_pickle's bool
            **encode_images(self.pixels),
            "labels": self.labels,
            "logits": self.logits,
            "tasks": self.tasks,
            "limits": np.array([self.capacity, self.max_bytes], np.int64),
        }
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> ReplayBuffer:
        try:
            with np.load(path, allow_pickle=False) as z:
                cap, max_bytes = (int(v) for v in z["limits"])
                labels = z["labels"]
                # Files from before entries were tagged: all entries count as one earlier experience.
                tasks = z["tasks"] if "tasks" in z.files else np.full(len(labels), -1, np.int32)
                # Files from before images were stored encoded hold the decoded pixels.
                pixels = (
                    z["pixels"] if "pixels" in z.files else decode_images(z["png"], z["png_offsets"], z["image_shape"])
                )
                return cls(cap, max_bytes, pixels, labels, z["logits"], tasks.astype(np.int32))
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(f"cannot read replay buffer {path}: {exc}") from None


def _pad(logits: np.ndarray, width: int) -> np.ndarray:
    """Right-pad logit rows with zeros when the table has grown since they were recorded."""
    if logits.shape[1] == width:
        return logits.astype(np.float16)
    out = np.zeros((logits.shape[0], width), np.float16)
    out[:, : logits.shape[1]] = logits
    return out
