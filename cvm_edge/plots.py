"""PNG plots of accuracy matrices: what people would rather look at than a table of numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cvm_edge.fsutil import atomic_write_bytes

Matrix = Sequence[Sequence[float | None]]


def plot_accuracy_matrices(matrices: Mapping[str, Matrix], path: Path, title: str = "") -> None:
    """One heat-map per run (rows: after update i, columns: classes of update j) plus the
    average-accuracy-after-each-update curves, written atomically as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on a device or in CI
    import matplotlib.pyplot as plt

    n = len(matrices)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items(), strict=False):
        arr = np.array([[np.nan if v is None else 100 * v for v in row] for row in m], dtype=float)
        ax.imshow(arr, vmin=0, vmax=100, cmap="viridis")
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                if not np.isnan(arr[i, j]):
                    ax.text(j, i, f"{arr[i, j]:.0f}", ha="center", va="center", color="w" if arr[i, j] < 60 else "k")
        ax.set_title(name)
        ax.set_xlabel("accuracy on classes of update j")
        ax.set_ylabel("after update i")
        ax.set_xticks(range(arr.shape[1]), [f"T{j + 1}" for j in range(arr.shape[1])])
        ax.set_yticks(range(arr.shape[0]), [f"T{i + 1}" for i in range(arr.shape[0])])
    curve = axes[0][n]
    for name, m in matrices.items():
        avg = [100 * float(np.mean([v for v in row if v is not None])) for row in m]
        curve.plot(range(1, len(avg) + 1), avg, marker="o", label=name)
    curve.set_ylim(0, 100)
    curve.set_xlabel("update")
    curve.set_ylabel("average accuracy on seen classes (%)")
    curve.legend()
    curve.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
