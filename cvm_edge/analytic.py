"""The analytic learner's arithmetic: a fixed random ReLU projection and ridge regression in closed form.

Frozen backbone features ``f`` are lifted to ``h = relu(f @ P)`` with a seeded Gaussian ``P`` (RanPAC,
McDonnell et al., NeurIPS 2023). A model's knowledge is three sums over every image ever learned:

- ``gram``       G = sum h h^T               ``[M, M]``
- ``class_sums`` S[c] = sum of h over class c ``[C, M]`` (one row per concept-table row)
- ``counts``     images per class            ``[C]``

Sums add, so learning a new batch of images, a new class or a new domain of a known class adds to
them, and the ridge solution ``W = (G + lambda I)^-1 S^T T`` equals one joint fit on everything seen so
far (ACIL, Zhuang et al., NeurIPS 2022): nothing is forgotten, no image is kept, and the sums of many
devices add up to the fleet's. ``T`` are the per-class targets: the class's concept row (its
prototypes' mean for multi-prototype tables: the CVM mapping, solved in closed form) or one-hot.
Keeping ``S`` rather than ``S^T T`` lets the target be chosen at solve time and lets rows be added.

Everything here is float64 numpy; the torch modules that serve the solution live in ``cvm_edge.model``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO

import numpy as np

from cvm_edge import vocabulary

TARGETS = vocabulary.ANALYTIC_TARGETS
# Shrinkage of the table whitening: the covariance's eigenvalues are raised by this share of their
# mean, so directions the table barely spans are not blown up without bound.
WHITEN_SHRINK = 0.01
DEFAULT_DIM = vocabulary.DEFAULT_ANALYTIC_DIM
# The .npz key of G's packed upper triangle (RidgeStats.to_arrays, RidgeStats.write_npz).
GRAM_KEY = "gram_triu"
# Ridge strengths relative to the mean diagonal of G (the mean squared projected activation), so
# one grid fits any backbone's feature scale; picked on held-out images per update.
RELATIVE_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def projection(in_dim: int, dim: int, seed: int) -> np.ndarray:
    """The fixed random projection ``P`` (``[in_dim, dim]``, float32), rebuilt from its seed.

    ``RandomState`` (not ``Generator``): its stream is frozen by NumPy's compatibility policy, so a
    store written today rebuilds the same ``P`` on another machine or NumPy release; the store also
    records :func:`projection_digest` and refuses a mismatch. Entries are N(0, 1/in_dim), so
    ``f @ P`` keeps the scale of ``f`` (float16 export stays in range)."""
    rs = np.random.RandomState(seed)
    return (rs.standard_normal((in_dim, dim)) / np.sqrt(in_dim)).astype(np.float32)


def projection_digest(p: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(p, dtype=np.float32).tobytes()).hexdigest()[:16]


def lift(features: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``relu(f @ P)`` in float64 (the sums are accumulated in float64)."""
    return np.maximum(np.asarray(features, np.float32) @ p, 0.0).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class RidgeStats:
    """G, per-class sums and counts (module docstring). Immutable: :meth:`add` returns new sums."""

    gram: np.ndarray  # [M, M] float64, symmetric
    class_sums: np.ndarray  # [C, M] float64
    counts: np.ndarray  # [C] int64

    @staticmethod
    def empty(dim: int, rows: int) -> RidgeStats:
        return RidgeStats(np.zeros((dim, dim)), np.zeros((rows, dim)), np.zeros(rows, np.int64))

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @property
    def rows(self) -> int:
        return int(self.counts.shape[0])

    def grown(self, rows: int) -> RidgeStats:
        """The same sums over ``rows`` table rows (the table only grows: new rows start at zero)."""
        if rows < self.rows:
            raise ValueError(f"a concept table never shrinks ({self.rows} rows -> {rows})")
        if rows == self.rows:
            return self
        extra = rows - self.rows
        return RidgeStats(
            self.gram,
            np.concatenate([self.class_sums, np.zeros((extra, self.dim))]),
            np.concatenate([self.counts, np.zeros(extra, np.int64)]),
        )

    def add(self, h: np.ndarray, labels: np.ndarray) -> RidgeStats:
        """These sums plus the lifted features ``h`` ``[N, M]`` of images with table rows ``labels``."""
        return self.add_chunks([(h, labels)])

    def add_chunks(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], *, reuse: bool = False) -> RidgeStats:
        """These sums plus every ``(h, labels)`` chunk's, accumulated into one new G in place (BLAS
        ``G += h^T h``): an update's lifted features need not exist all at once (1,700 images at
        M = 2,048 are 28 MB in float64, and a product ``h^T h`` is another G).

        ``reuse``: accumulate into this object's own G instead of a copy, for a caller that gives
        these sums up (``cvm update``, whose previous sums are on disk): at M = 4,096 G is 134 MB.
        This object must not be read again."""
        import torch  # the train side's BLAS with an in-place accumulate; this module itself stays numpy

        gram = self.gram if reuse else self.gram.copy()
        g = torch.from_numpy(gram)
        sums = self.class_sums.copy()
        counts = self.counts.copy()
        for h, labels in chunks:
            labels = np.asarray(labels, np.int64)
            if h.ndim != 2 or h.shape[1] != self.dim or len(h) != len(labels):
                raise ValueError(f"features {h.shape} do not fit sums of dimension {self.dim} and {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.rows):
                raise ValueError(f"labels must be table rows in [0, {self.rows})")
            h = np.ascontiguousarray(h, np.float64)
            ht = torch.from_numpy(h)
            g.addmm_(ht.T, ht)
            np.add.at(sums, labels, h)
            counts += np.bincount(labels, minlength=self.rows)
        return RidgeStats(gram, sums, counts)

    def merged(self, other: RidgeStats) -> RidgeStats:
        """The sums of two devices (or two updates): exactly those of one pass over both."""
        rows = max(self.rows, other.rows)
        a, b = self.grown(rows), other.grown(rows)
        if a.dim != b.dim:
            raise ValueError(f"sums of dimension {a.dim} and {b.dim} cannot be merged")
        return RidgeStats(a.gram + b.gram, a.class_sums + b.class_sums, a.counts + b.counts)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """G's upper triangle only (it is symmetric): half the bytes on flash."""
        return {GRAM_KEY: upper_triangle(self.gram), **self._sums()}

    def _sums(self) -> dict[str, np.ndarray]:
        return {"class_sums": self.class_sums, "counts": self.counts}

    def write_npz(self, file: BinaryIO, extra: Mapping[str, np.ndarray]) -> None:
        """:meth:`to_arrays` and ``extra`` as one .npz (what ``np.savez`` writes, and ``np.load``
        reads), streamed into ``file`` with G's upper triangle written a row at a time: never packed
        in memory (67 MB at M = 4,096, at the peak of an update's save)."""
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, arr in {**self._sums(), **extra}.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, np.asanyarray(arr), allow_pickle=False)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)), "fortran_order": False}
            with z.open(f"{GRAM_KEY}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, {**header, "shape": (self.dim * (self.dim + 1) // 2,)})
                for row in upper_rows(self.gram):
                    out.write(np.ascontiguousarray(row, dtype=np.float64).data)

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> RidgeStats:
        sums = np.asarray(arrays["class_sums"], np.float64)
        counts = np.asarray(arrays["counts"], np.int64)
        triu = np.asarray(arrays[GRAM_KEY], np.float64)
        dim = sums.shape[1] if sums.ndim == 2 else -1
        if sums.ndim != 2 or counts.shape != (sums.shape[0],) or triu.shape != (dim * (dim + 1) // 2,):
            raise ValueError(
                f"ridge statistics of inconsistent shapes: class_sums {sums.shape}, counts {counts.shape}, "
                f"gram_triu {triu.shape}"
            )
        if not (np.isfinite(triu).all() and np.isfinite(sums).all()) or (counts < 0).any():
            raise ValueError("ridge statistics hold non-finite values or negative counts")
        return RidgeStats(symmetric_from_upper(triu, dim), sums, counts)

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`to_arrays` (G's upper triangle in float64, the sums, the counts), counted
        without building them."""
        return self.dim * (self.dim + 1) // 2 * 8 + self.class_sums.nbytes + self.counts.nbytes


# G's upper triangle is packed and unpacked a row at a time: np.triu_indices of M = 2,048 alone is two
# 34 MB index arrays, and G + triu(G, 1).T two more copies of G (~150 MB at the peak of loading a store).
def upper_rows(a: np.ndarray) -> Iterator[np.ndarray]:
    """The rows of square ``a``'s upper triangle, in the packed order (that of ``a[np.triu_indices(n)]``):
    :func:`upper_triangle` and :meth:`RidgeStats.write_npz` both lay G out by it."""
    return (a[i, i:] for i in range(a.shape[0]))


def upper_triangle(a: np.ndarray) -> np.ndarray:
    """The upper triangle of square ``a``, packed row by row (:func:`upper_rows`)."""
    n = a.shape[0]
    out = np.empty(n * (n + 1) // 2, a.dtype)
    k = 0
    for row in upper_rows(a):
        out[k : k + len(row)] = row
        k += len(row)
    return out


def symmetric_from_upper(triu: np.ndarray, n: int) -> np.ndarray:
    """The symmetric ``[n, n]`` matrix whose upper triangle :func:`upper_triangle` packed."""
    out = np.empty((n, n), np.float64)
    k = 0
    for i in range(n):
        row = triu[k : k + n - i]
        out[i, i:] = row
        out[i:, i] = row
        k += n - i
    return out


def whiten_table(table: np.ndarray, shrink: float = WHITEN_SHRINK) -> np.ndarray:
    """The concept table after centring and (shrunk) whitening over its classes, rows renormalised;
    zero padding rows of a ``[C, P, D]`` table stay zero.

    Sentence-embedding rows share a large common component (their pairwise cosines sit around
    0.2-0.5), so ridge targets that are raw rows spend the fit on what all classes share and their
    cosines separate classes poorly. Whitened rows are close to orthonormal over the table's classes
    (one-hot in a rotated basis) but stay a fixed linear map of the language model's space, so a class
    added by name gets its row by the same map. A function of the table alone: it is recomputed, never
    stored, and changes when classes are appended (the solve recomputes the targets too)."""
    t = np.asarray(table, np.float64)
    real = np.any(t != 0, axis=-1)
    rows = class_targets(t, "concepts")  # one unit row per class (prototype means)
    mu = rows.mean(axis=0)
    x = rows - mu
    e, v = np.linalg.eigh(x.T @ x / len(x))
    e = np.maximum(e, 0.0)
    pos = e[e > 1e-12 * max(float(e.max()), 1e-300)]
    eps = shrink * (float(pos.mean()) if len(pos) else 1.0)
    a = v @ np.diag(1.0 / np.sqrt(e + eps)) @ v.T
    out = (t - mu) @ a
    out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return (out * real[..., None]).astype(np.float32)


def class_targets(table: np.ndarray, kind: str) -> np.ndarray:
    """Per-class regression targets ``[C, K]``: the concept row (a multi-prototype class: the mean of
    its real prototypes, renormalised), the row of the whitened table (:func:`whiten_table`), or
    one-hot (``K = C``)."""
    if kind not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, not {kind!r}")
    t = np.asarray(table, np.float64)
    if kind == "onehot":
        return np.eye(t.shape[0])
    if kind == "whitened":
        t = np.asarray(whiten_table(t), np.float64)
    if t.ndim == 3:  # [C, P, D] with all-zero padding rows
        real = np.any(t != 0, axis=-1, keepdims=True)
        t = (t * real).sum(axis=1) / np.maximum(real.sum(axis=1), 1)
    return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class RidgePath:
    """The ridge solutions of one G and right-hand side, for any lambda.

    Each lambda is one Cholesky factorisation of ``G + lambda I`` and two triangular solves, in
    float64 through LAPACK: the eight of the lambda grid cost about a third of the one
    eigendecomposition of G they replaced (M = 2,048, 2 cores: ~3 s against ~8 s of CPU, the
    largest step of an analytic update after the backbone).

    The factorisation runs in place in G's *lower* triangle; the upper triangle, which is what a
    store keeps of G (:meth:`RidgeStats.to_arrays`), is never written, and the lower triangle and the
    diagonal are restored from it afterwards. So a solve needs no second ``[M, M]`` array: at
    M = 4,096 a copy of G is 134 MB, the difference between an update over 1 GB and one under it."""

    gram: np.ndarray  # [M, M] float64, the stats' own array (its lower triangle is work space)
    rhs: np.ndarray  # S^T T, [M, K] float64
    scale: float  # mean diagonal of G: lambdas are relative to it

    def __post_init__(self) -> None:
        # Once, not per lambda: G built by BLAS need not be bitwise symmetric, and from here on every
        # lambda factors exactly the matrix a store keeps (its upper triangle, mirrored).
        mirror_upper(self.gram)

    @staticmethod
    def of(stats: RidgeStats, targets: np.ndarray) -> RidgePath:
        rhs = stats.class_sums.T @ targets[: stats.rows]
        scale = float(np.trace(stats.gram)) / stats.dim
        return RidgePath(stats.gram, rhs, scale if scale > 0 else 1.0)

    def solve(self, relative_lambda: float) -> np.ndarray:
        """``W = (G + lambda I)^-1 C`` with ``lambda = relative_lambda * scale`` (``[M, K]``, float64)."""
        from scipy.linalg import lapack  # the train side's LAPACK; this module's callers need not load it

        lam = relative_lambda * self.scale
        g = self.gram
        diag = np.diag(g).copy()
        # G's transpose is a Fortran-ordered view of the same memory: LAPACK factors it in place, and
        # its "upper" triangle is G's lower one, restored from G's upper triangle afterwards.
        a = g.T
        try:
            a[np.diag_indices_from(a)] += lam
            factor, info = lapack.dpotrf(a, lower=0, clean=0, overwrite_a=1)
            if info == 0:
                w, info = lapack.dpotrs(factor, self.rhs, lower=0)
                if info == 0:
                    return np.asarray(w)
        finally:
            mirror_upper(g)
            g[np.diag_indices_from(g)] = diag
        # not positive definite in floating point (G's rounding beyond a tiny lambda): a general solve
        return np.linalg.solve(g + lam * np.eye(len(g)), self.rhs)


def mirror_upper(a: np.ndarray, block: int = 256) -> None:
    """Set the square matrix ``a``'s strict lower triangle to its upper triangle's transpose, in place,
    a block of rows at a time (no ``[M, M]`` temporary)."""
    n = a.shape[0]
    for i in range(0, n, block):
        j = min(n, i + block)
        a[i:j, :i] = a[:i, i:j].T
        square = a[i:j, i:j]
        lower = np.tril_indices(j - i, -1)
        square[lower] = square.T[lower]


def solve(stats: RidgeStats, targets: np.ndarray, relative_lambda: float) -> np.ndarray:
    """The ridge solution by a direct linear solve (the reference :class:`RidgePath` is tested against)."""
    lam = relative_lambda * max(float(np.trace(stats.gram)) / stats.dim, 0.0) or relative_lambda
    rhs = stats.class_sums.T @ targets[: stats.rows]
    return np.linalg.solve(stats.gram + lam * np.eye(stats.dim), rhs)


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of per-class accuracy (a class with many held-out images counts once)."""
    classes = np.unique(labels)
    if not len(classes):
        return float("nan")
    return float(np.mean([(pred[labels == c] == c).mean() for c in classes]))


@dataclasses.dataclass(frozen=True)
class LambdaChoice:
    relative_lambda: float
    weight: np.ndarray  # [M, K] float64
    scores: dict[str, float]  # held-out balanced accuracy per candidate (str(lambda) -> accuracy)


def choose_lambda(
    path: RidgePath,
    val_h: np.ndarray,
    val_labels: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    grid: Sequence[float] = RELATIVE_LAMBDAS,
) -> LambdaChoice:
    """The grid's lambda with the best balanced held-out accuracy (ties: the larger, smoother one).
    ``predict`` maps ridge outputs ``val_h @ W`` to predicted table rows. Without held-out images the
    middle of the grid is taken."""
    grid = sorted(grid)
    if not len(val_labels):
        lam = grid[len(grid) // 2]
        return LambdaChoice(lam, path.solve(lam), {})
    scores: dict[str, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    for lam in grid:
        w = path.solve(lam)
        acc = balanced_accuracy(predict(val_h @ w), val_labels)
        scores[f"{lam:g}"] = round(acc, 6)
        if best is None or acc >= best[0]:
            best = (acc, lam, w)  # kept, not solved again
    assert best is not None
    return LambdaChoice(best[1], best[2], scores)


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Backbone features of every update's held-out images (float16; no pixels), with their table
    rows and the update that brought them: the forgetting gate and the lambda choice use them."""

    features: np.ndarray  # [N, F] float16
    labels: np.ndarray  # [N] int64
    tasks: np.ndarray  # [N] int64, 1-based update index

    @staticmethod
    def empty(feat_dim: int) -> HeldOut:
        return HeldOut(np.zeros((0, feat_dim), np.float16), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def added(self, features: np.ndarray, labels: np.ndarray, task: int) -> HeldOut:
        return HeldOut(
            np.concatenate([self.features, np.asarray(features, np.float16)]),
            np.concatenate([self.labels, np.asarray(labels, np.int64)]),
            np.concatenate([self.tasks, np.full(len(labels), task, np.int64)]),
        )
