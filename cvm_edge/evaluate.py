"""Accuracy per class over the classes seen so far, and the task-by-task accuracy matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import predict_logits


def classes_from_logits(logits: np.ndarray, seen: Sequence[int]) -> np.ndarray:
    """Predicted table rows from logits over all rows, choosing only among ``seen`` classes."""
    seen_arr = np.asarray(sorted(seen), dtype=np.int64)
    if len(logits) == 0:
        return np.zeros((0,), np.int64)
    return seen_arr[np.argmax(logits[:, seen_arr], axis=1)]


def predict_classes(
    model: nn.Module, prep: Preprocessing, pixels: np.ndarray, seen: Sequence[int], device: torch.device | str = "cpu"
) -> np.ndarray:
    """Predicted table rows, choosing only among ``seen`` classes."""
    return classes_from_logits(predict_logits(model, prep, pixels, device), seen)


def mean_over(acc: dict[int, float], classes: Sequence[int]) -> float | None:
    vals = [acc[c] for c in classes if c in acc]
    return float(np.mean(vals)) if vals else None


def trained_classes(entry: dict[str, object]) -> list[int]:
    """The classes an update trained on: its new and its revisited (known) classes. Entries written
    before revisited classes were recorded lack ``trained_classes``; their ``new_classes`` held
    every class of the update's data, which is the same set."""
    key = "trained_classes" if "trained_classes" in entry else "new_classes"
    return [int(c) for c in entry[key]]  # type: ignore[attr-defined]


def accuracy_matrix(history: Sequence[dict[str, object]]) -> list[list[float | None]]:
    """a[i][j]: mean accuracy on the classes update j trained on (new or revisited), after update i
    (None for j > i), on all held-out images of those classes (every domain seen so far)."""
    tasks = [trained_classes(h) for h in history]
    rows = []
    for i, h in enumerate(history):
        acc = {int(k): float(v) for k, v in dict(h["per_class_accuracy"]).items()}  # type: ignore[call-overload]
        rows.append([mean_over(acc, tasks[j]) if j <= i else None for j in range(len(history))])
    return rows


def format_matrix(matrix: Sequence[Sequence[float | None]], title: str) -> str:
    n = len(matrix)
    lines = [title, "after \\ on " + " ".join(f"{'T' + str(j + 1):>6}" for j in range(n)) + "    avg"]
    for i, row in enumerate(matrix):
        vals = [v for v in row if v is not None]
        cells = " ".join(f"{100 * v:6.1f}" if v is not None else f"{'':>6}" for v in row)
        lines.append(f"{'T' + str(i + 1):>11} {cells} {100 * float(np.mean(vals)):6.1f}")
    return "\n".join(lines)
