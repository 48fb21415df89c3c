"""The coordinator's arithmetic of a round (numpy only): add the accepted devices' statistics, and
pick lambda from their held-out votes exactly as one device would on the union of their held-out
images (balanced accuracy over classes; ties go to the larger, smoother lambda)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np

from cvm_edge.analytic import RidgeStats
from fleet.wire import Contribution, ContributionError, Expected, check_contribution


class QuorumError(RuntimeError):
    """Too few devices contributed to publish the round; ``refused`` names those left out and why."""

    def __init__(self, message: str, refused: Mapping[str, str]) -> None:
        super().__init__(message)
        self.refused = dict(refused)


@dataclasses.dataclass(frozen=True)
class RoundMerge:
    stats: RidgeStats  # the fleet's statistics after this round
    accepted: tuple[str, ...]
    refused: Mapping[str, str]  # device -> why it was left out
    merged_ids: Mapping[str, str]  # device -> id of the contribution merged


def merge_round(
    current: RidgeStats,
    contributions: Sequence[Contribution],
    expected: Expected,
    asked: Sequence[str],
    quorum: float,
    failed: Mapping[str, str] | None = None,
) -> RoundMerge:
    """``current`` plus every contribution that matches ``expected``. ``asked`` are the devices the
    round asked; ``failed`` those that sent no answer (dropped out, errors). Raises QuorumError when
    fewer than ``quorum`` (a share of ``asked``) contributed: nothing is published then."""
    accepted, refused = checked(contributions, lambda c: check_contribution(c, expected), asked, quorum, failed)
    total = current.grown(expected.rows)
    for c in accepted:
        total = total.merged(c.stats.grown(expected.rows))
    ids = {c.device: c.contribution_id for c in accepted}
    return RoundMerge(total, tuple(c.device for c in accepted), refused, ids)


class _FromDevice(Protocol):
    @property
    def device(self) -> str: ...


_U = TypeVar("_U", bound=_FromDevice)


def checked(
    uploads: Sequence[_U],
    check: Callable[[_U], None],
    asked: Sequence[str],
    quorum: float,
    failed: Mapping[str, str] | None = None,
) -> tuple[list[_U], dict[str, str]]:
    """The uploads that pass ``check`` (it raises ContributionError), and every device left out with
    why (``failed``: those that sent none). Raises QuorumError when the passing ones are fewer than
    ``quorum`` of ``asked``: the one rule every merge, analytic or gradient, applies."""
    refused: dict[str, str] = dict(failed or {})
    accepted: list[_U] = []
    for u in uploads:
        try:
            check(u)
        except ContributionError as exc:
            refused[u.device] = str(exc)
            continue
        accepted.append(u)
    require_quorum(len(accepted), asked, quorum, refused)
    return accepted, refused


def require_quorum(accepted: int, asked: Sequence[str], quorum: float, refused: Mapping[str, str]) -> None:
    """Raise QuorumError when ``accepted`` devices are fewer than ``quorum`` (a share of ``asked``),
    naming each device ``refused`` and why (every merge, analytic or gradient, uses this rule)."""
    need = int(np.ceil(quorum * len(asked) - 1e-9))
    if not asked or accepted < max(1, need):
        why = "; ".join(f"{d}: {r}" for d, r in sorted(refused.items())) or "no device answered"
        raise QuorumError(
            f"{accepted} of {len(asked)} devices contributed, the quorum needs {max(1, need)} ({why})", refused
        )


@dataclasses.dataclass(frozen=True)
class Votes:
    """A device's held-out tally for each candidate lambda: correct predictions per class."""

    correct: np.ndarray  # [L, K] int64
    total: np.ndarray  # [K] int64


def choose_lambda(grid: Sequence[float], votes: Sequence[Votes]) -> tuple[float, dict[str, float]]:
    """The grid's lambda with the best balanced accuracy over the union of the devices' held-out
    images; the middle of the grid when nobody holds any."""
    rows = max((v.total.shape[0] for v in votes), default=0)
    correct = np.zeros((len(grid), rows), np.int64)
    total = np.zeros(rows, np.int64)
    for v in votes:
        if v.correct.shape != (len(grid), v.total.shape[0]):
            raise ValueError(f"votes of shape {v.correct.shape} for a grid of {len(grid)}")
        k = v.total.shape[0]
        correct[:, :k] += v.correct
        total[:k] += v.total
    classes = total > 0
    if not classes.any():
        return float(grid[len(grid) // 2]), {}
    acc = (correct[:, classes] / total[classes]).mean(axis=1)
    scores = {f"{lam:g}": round(float(a), 6) for lam, a in zip(grid, acc, strict=True)}
    best = max(range(len(grid)), key=lambda i: (acc[i], grid[i]))
    return float(grid[best]), scores


def class_accuracy(grid: Sequence[float], lam: float, votes: Votes) -> dict[int, float]:
    """Per-class held-out accuracy of one device at the chosen lambda."""
    i = list(grid).index(lam)
    return {int(c): float(votes.correct[i, c] / votes.total[c]) for c in np.flatnonzero(votes.total)}


def summed(votes: Sequence[Votes]) -> Votes:
    """The fleet's tally: every device's held-out images together."""
    rows = max((v.total.shape[0] for v in votes), default=0)
    correct = np.zeros((max((v.correct.shape[0] for v in votes), default=0), rows), np.int64)
    total = np.zeros(rows, np.int64)
    for v in votes:
        correct[:, : v.total.shape[0]] += v.correct
        total[: v.total.shape[0]] += v.total
    return Votes(correct, total)
