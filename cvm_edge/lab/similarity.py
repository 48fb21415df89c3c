"""Task similarity from the concept table: how close an update's new classes are to the old ones.

After He et al. (2023, continual instruction tuning of multimodal models): how much a model
forgets depends on how similar the tasks are, and that similarity can steer regularisation. Here
the tasks are sets of classes and their similarity is read off the fixed concept table, before
any training, so it costs nothing and can be logged with every update.

Each class is one unit vector: its row, or for a multi-prototype class the normalised mean of
its prototype rows. For an update with new classes N and old classes O:

- ``risk(o) = max_{n in N} cos(o, n)`` for each old class: in a cosine head, a new class row
  close to an old one pulls the old class's images towards the new row, so the old classes with
  the nearest new neighbour are the ones most at risk of being forgotten (reported, sorted);
- ``similarity = mean_{o in O, n in N} cos(o, n)``, the mean old-new cosine;
- ``reference = mean_{i != j} cos(i, j)`` over every pair of classes in the table.

**Scaling** (``similarity_scaling = P`` in ``cvm update --experimental --config FILE``, ``PluginOptions.similarity_scaling``): distillation
weight and EWC lambda are multiplied by ``factor = clip((similarity / reference) ** P, 1/4, 4)``
(1 when there are no old classes). Why this form: sentence-embedding cosines carry a large
common offset (MiniLM puts unrelated class names at 0.2-0.4), so a raw cosine is no strength;
the ratio to the table's own mean pair cosine is 1 for a typical update, above 1 when the new
classes are closer to the old than classes of this label space usually are (protect more), below
1 when they are unrelated (let the model move more). ``P = 1`` is proportional, larger ``P``
sharper, and ``P = -1`` reverses the direction (He et al. found, for instruction tuning, that
similar tasks can also transfer rather than interfere; the benchmark decides which holds here).
The clip keeps it a modulation of a tuned weight, never a switch. Needs numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cvm_edge.strategy import Context

MIN_FACTOR, MAX_FACTOR = 0.25, 4.0
TOP_AT_RISK = 5


def class_vectors(table: np.ndarray) -> np.ndarray:
    """Unit ``[C, D]`` class vectors of a head table (``ConceptTable.as_float32()``: ``[C, D]``,
    or ``[C, P, D]`` with all-zero padding rows, which add nothing to the mean)."""
    v = np.asarray(table, dtype=np.float64)
    if v.ndim == 3:
        v = v.sum(axis=1)
    if v.ndim != 2:
        raise ValueError(f"a concept table is [C, D] or [C, P, D], got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32)


def reference_similarity(vectors: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct classes (0 for fewer than two classes)."""
    c = len(vectors)
    if c < 2:
        return 0.0
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    return float((sims.sum() - np.trace(sims)) / (c * (c - 1)))


def scaling_factor(similarity: float | None, reference: float, power: float) -> float:
    """``clip((similarity / reference) ** power, MIN_FACTOR, MAX_FACTOR)``; 1 when there is nothing
    to compare (no old classes, power 0, or a table whose mean pair cosine is not positive)."""
    if similarity is None or power == 0 or reference <= 1e-6:
        return 1.0
    ratio = max(similarity / reference, 1e-6)  # a negative mean cosine is "as unrelated as it gets"
    return float(np.clip(ratio**power, MIN_FACTOR, MAX_FACTOR))


@dataclasses.dataclass(frozen=True)
class ClassRisk:
    row: int
    cosine: float  # max cosine to any new class
    nearest_new: int


@dataclasses.dataclass(frozen=True)
class TaskSimilarity:
    new_classes: tuple[int, ...]
    old_classes: tuple[int, ...]
    similarity: float | None  # mean old-new cosine; None without old classes
    max_cosine: float | None
    reference: float
    risks: tuple[ClassRisk, ...]  # every old class, most at risk first

    def factor(self, power: float) -> float:
        return scaling_factor(self.similarity, self.reference, power)

    def to_dict(self, names: Sequence[str], power: float = 0.0, top: int = TOP_AT_RISK) -> dict[str, Any]:
        """JSON-ready summary (class names, rounded figures) for logs, history and status."""
        r = lambda x: None if x is None else round(float(x), 4)  # noqa: E731
        return {
            "similarity": r(self.similarity),
            "max_cosine": r(self.max_cosine),
            "reference": r(self.reference),
            "ratio": r(None if self.similarity is None or self.reference <= 0 else self.similarity / self.reference),
            "scaling_power": power,
            "factor": r(self.factor(power)),
            "at_risk": [
                {"class": names[k.row], "cosine": r(k.cosine), "nearest_new": names[k.nearest_new]}
                for k in self.risks[:top]
            ],
            "old_class_risk": {names[k.row]: r(k.cosine) for k in self.risks},
        }

    def summary(self, names: Sequence[str], top: int = 3) -> str:
        if self.similarity is None:
            return "no new classes: nothing at risk" if not self.new_classes else "no old classes: nothing at risk"
        risky = ", ".join(f"{names[k.row]} ({k.cosine:.2f} to {names[k.nearest_new]})" for k in self.risks[:top])
        return f"mean old-new cosine {self.similarity:.3f} (table mean {self.reference:.3f}); most at risk: {risky}"


def task_similarity(vectors: np.ndarray, new_classes: Sequence[int], old_classes: Sequence[int]) -> TaskSimilarity:
    """Similarity of an update's new classes to the old ones; ``vectors`` from :func:`class_vectors`."""
    new = [int(c) for c in new_classes if int(c) not in set(map(int, old_classes))]
    old = [int(c) for c in old_classes]
    reference = reference_similarity(vectors)
    if not new or not old:
        return TaskSimilarity(tuple(new), tuple(old), None, None, reference, ())
    sims = vectors[old].astype(np.float64) @ vectors[new].T.astype(np.float64)  # [O, N]
    best = sims.argmax(axis=1)
    risks = [ClassRisk(o, float(sims[i, best[i]]), new[int(best[i])]) for i, o in enumerate(old)]
    risks.sort(key=lambda k: (-k.cosine, k.row))
    return TaskSimilarity(tuple(new), tuple(old), float(sims.mean()), float(sims.max()), reference, tuple(risks))


def experience_factor(ctx: Context, power: float) -> float:
    """The scaling factor of the experience a plugin is about to train, from the concept table
    inside the model's head (the same table ``cvm update`` reports from). Heads without a concept
    table (the linear baseline) have no class vectors: factor 1."""
    table = getattr(ctx.model.head, "table", None)
    if power == 0 or table is None:
        return 1.0
    vectors = class_vectors(table.detach().float().cpu().numpy())
    sim = task_similarity(vectors, ctx.current_classes.tolist(), ctx.old_classes.tolist())
    return sim.factor(power)
