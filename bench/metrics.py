"""Continual-learning metrics from an accuracy matrix ``a[i][j]`` (percent): accuracy on task j's
test set after training task i, predicting among all classes seen by then (class-incremental).

Domain-incremental protocols fill every cell (task j's test set is domain j, all classes, also
before domain j is trained: a[i][j] for j > i is zero-shot transfer). The metrics below read only
cells with j <= i, so they mean the same there: final average = mean accuracy over all domains after
the last task, forgetting = how much of each earlier domain was lost."""

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


def forgetting_per_task(a: Matrix) -> list[float | None]:
    """For every task j before the last: best accuracy on it before the last step minus the final one
    (the terms :func:`forgetting` averages); None for the last task, which nothing came after."""
    t = len(a)
    return [
        max(a[i][j] for i in range(j, t - 1)) - a[t - 1][j] if j < t - 1 else None  # type: ignore[type-var,operator]
        for j in range(t)
    ]


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
