"""Continual-learning metrics from an accuracy matrix ``a[i][j]`` (percent): accuracy on task j's
test set after training task i, predicting among all classes seen by then (class-incremental)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]]


def final_average(a: Matrix) -> float:
    """Mean accuracy over all tasks after the last one."""
    return float(np.mean([v for v in a[-1] if v is not None]))


def average_incremental(a: Matrix) -> float:
    """Mean over steps i of the mean accuracy on tasks 0..i (Rebuffi et al., iCaRL)."""
    return float(np.mean([np.mean([a[i][j] for j in range(i + 1)]) for i in range(len(a))]))  # type: ignore[misc]


def forgetting(a: Matrix) -> float | None:
    """Mean over old tasks of (best accuracy before the last step) - (final accuracy) (Chaudhry et al. 2018)."""
    t = len(a)
    if t < 2:
        return None
    vals = [max(a[i][j] for i in range(j, t - 1)) - a[t - 1][j] for j in range(t - 1)]  # type: ignore[type-var,operator]
    return float(np.mean(vals))


def backward_transfer(a: Matrix) -> float | None:
    """Mean over old tasks of (final accuracy) - (accuracy right after learning it) (Lopez-Paz & Ranzato 2017)."""
    t = len(a)
    if t < 2:
        return None
    return float(np.mean([a[t - 1][j] - a[j][j] for j in range(t - 1)]))  # type: ignore[operator]


def summarise(a: Matrix) -> dict[str, float | None]:
    return {
        "final_avg_acc": final_average(a),
        "avg_incremental_acc": average_incremental(a) if all(len(r) >= len(a) for r in a) else None,
        "forgetting": forgetting(a),
        "bwt": backward_transfer(a),
    }
