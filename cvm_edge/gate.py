"""The forgetting gate of ``cvm update``: old-class accuracy on earlier held-out images before and
after an update, and since each class was learned, scored the same way for every learner."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cvm_edge.evaluate import mean_over, trained_classes


class ValidationScorer:
    """Per-class validation accuracy before and after learning.

    Rows are the earlier updates' held-out images first, then this update's (``n_earlier`` splits
    them). ``predict(keep)`` gives the predicted table rows (among the seen classes) of the rows
    where ``keep``: each learner supplies its own (cached features for a frozen backbone)."""

    def __init__(self, labels: np.ndarray, n_earlier: int, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        self.labels = labels
        self.earlier = np.arange(len(labels)) < n_earlier
        self._predict = predict

    def predict(self, keep: np.ndarray) -> np.ndarray:
        """Predicted table rows of the rows where ``keep``; -1 elsewhere."""
        pred = np.full(len(self.labels), -1, np.int64)
        if keep.any():
            pred[keep] = self._predict(keep)
        return pred

    def rows(self, earlier_classes: Sequence[int], current_classes: Sequence[int]) -> np.ndarray:
        """Earlier held-out rows of ``earlier_classes`` and this update's rows of ``current_classes``."""
        return (self.earlier & np.isin(self.labels, list(earlier_classes))) | (
            ~self.earlier & np.isin(self.labels, list(current_classes))
        )

    def accuracy(self, pred: np.ndarray, classes: Sequence[int], part: str) -> dict[int, float]:
        """Per-class accuracy of ``pred`` on the ``earlier`` or ``current`` rows, or on ``all``."""
        rows = {"earlier": self.earlier, "current": ~self.earlier, "all": np.ones(len(self.labels), bool)}[part]
        out = {}
        for c in classes:
            mask = rows & (self.labels == c)
            if mask.any():
                if (pred[mask] < 0).any():
                    raise AssertionError(f"class {c} was not predicted on the {part} rows")  # a caller's bug
                out[int(c)] = float((pred[mask] == c).mean())
        return out


@dataclasses.dataclass(frozen=True)
class ForgettingGate:
    """Old-class accuracy on earlier held-out images: before this update, when each class was last
    learned (the accuracy matrix's diagonal), and after; the falls since each, in points."""

    before: float | None
    learned: float | None
    after: float | None
    acc_before: dict[int, float]
    acc_learned: dict[int, float]

    @property
    def since_previous(self) -> float:
        return _points(self.before, self.after)

    @property
    def since_learned(self) -> float:
        return _points(self.learned, self.after)

    @property
    def reference(self) -> dict[int, float]:
        return self.acc_before if self.since_previous >= self.since_learned else self.acc_learned

    def figures(self) -> dict[str, float | None]:
        return {
            "old_accuracy_when_learned": self.learned,
            "forgetting_since_previous": round(self.since_previous, 3),
            "forgetting_since_learned": round(self.since_learned, 3),
        }

    def describe(self) -> str:
        since, ref = (
            ("the previous version", self.before)
            if self.since_previous >= self.since_learned
            else ("when they were learned", self.learned)
        )
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        worst = max(self.since_previous, self.since_learned)
        return (
            f"old-class accuracy on earlier held-out images would fall by {worst:.1f} points since {since} "
            f"({pct(ref)} -> {pct(self.after)})"
        )


def forgetting_gate(
    history: Sequence[dict[str, Any]],
    old_classes: Sequence[int],
    acc_before: dict[int, float],
    acc_after: dict[int, float],
) -> ForgettingGate:
    """Both gates' figures: a single step's fall, and the fall since each old class was learned, so
    that several small steps cannot add up to more than --max-forgetting."""
    learned = accuracy_when_learned(history, old_classes)
    return ForgettingGate(
        mean_over(acc_before, old_classes),
        mean_over(learned, old_classes),
        mean_over(acc_after, old_classes),
        acc_before,
        learned,
    )


def _points(before: float | None, after: float | None) -> float:
    return 100.0 * (before - after) if before is not None and after is not None else 0.0


def accuracy_when_learned(history: Sequence[dict[str, Any]], classes: Sequence[int]) -> dict[int, float]:
    """Each class's held-out accuracy right after the latest update that trained it."""
    out: dict[int, float] = {}
    for entry in history:
        acc = entry.get("per_class_accuracy", {})
        for c in trained_classes(entry):
            if c in classes and str(c) in acc:
                out[c] = float(acc[str(c)])
    return out


def revisited_figures(
    revisited: Sequence[int],
    new_before: dict[int, float],
    new_after: dict[int, float],
    earlier_before: dict[int, float],
    earlier_after: dict[int, float],
) -> dict[str, float | None] | None:
    """Mean accuracy of the revisited classes on this update's held-out images (the new domain)
    and on their earlier held-out images (the domains the previous version knew), before and after."""
    if not revisited:
        return None
    return {
        "new_data_before": mean_over(new_before, revisited),
        "new_data_after": mean_over(new_after, revisited),
        "earlier_data_before": mean_over(earlier_before, revisited),
        "earlier_data_after": mean_over(earlier_after, revisited),
    }


def worst_drops(before: dict[int, float], after: dict[int, float], names: Sequence[str], top: int = 3) -> str:
    drops = sorted(((before[c] - after[c], c) for c in before), reverse=True)[:top]
    listed = ", ".join(f"{names[c]} {100 * before[c]:.0f}% -> {100 * after[c]:.0f}%" for d, c in drops if d > 0)
    return f" Fell most: {listed}." if listed else ""
