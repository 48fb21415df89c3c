"""What travels between a device and the coordinator, as plain arrays (Flower-free).

Ridge statistics go as G's upper triangle (G is symmetric), the per-class sums and the counts. A
device's upload may be float32 (``WIRE_DTYPES``): M = 2,048 then costs 8.4 MB instead of 16.8 MB, and
the coordinator adds it up in float64. The global statistics travel back in float64, so every device
holds bit for bit what the coordinator holds."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from cvm_edge.analytic import RidgeStats

WIRE_DTYPES = ("float32", "float64")


class ContributionError(ValueError):
    """A device's statistics that cannot join the round (shape, fingerprints, values)."""


def pack_stats(stats: RidgeStats, dtype: str = "float64") -> dict[str, np.ndarray]:
    """G's upper triangle, and the sums of only the classes with images (a device of a fleet with
    hundreds of classes sees a few)."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {WIRE_DTYPES}, not {dtype!r}")
    rows = np.flatnonzero(stats.counts)
    return {
        "gram_triu": stats.to_arrays()["gram_triu"].astype(dtype),
        "rows": np.asarray([stats.rows], np.int64),
        "class_rows": rows.astype(np.int64),
        "class_sums": stats.class_sums[rows].astype(dtype),
        "counts": stats.counts[rows].astype(np.int64),
    }


def unpack_stats(arrays: dict[str, np.ndarray], max_rows: int = 1 << 20, dim: int | None = None) -> RidgeStats:
    """Statistics from the wire, checked (dtypes, shapes, finite values, counts) before anything the
    size of the table is allocated: an upload that costs a few bytes must not make the coordinator
    allocate rows x dim floats. ``dim``: the only dimension accepted (the fleet's). Raises
    ContributionError."""
    missing = {"gram_triu", "rows", "class_rows", "class_sums", "counts"} - set(arrays)
    if missing:
        raise ContributionError(f"statistics without {', '.join(sorted(missing))}")
    rows_arr, idx = np.asarray(arrays["rows"]), np.asarray(arrays["class_rows"])
    sums, counts = np.asarray(arrays["class_sums"]), np.asarray(arrays["counts"])
    triu = np.asarray(arrays["gram_triu"])
    for name, a, kinds in (
        ("rows", rows_arr, "iu"),
        ("class_rows", idx, "iu"),
        ("counts", counts, "iu"),
        ("class_sums", sums, "f"),
        ("gram_triu", triu, "f"),
    ):
        if a.dtype.kind not in kinds:
            raise ContributionError(f"{name} of dtype {a.dtype}")
    if rows_arr.shape != (1,) or idx.ndim != 1 or sums.ndim != 2 or counts.shape != idx.shape or len(sums) != len(idx):
        raise ContributionError("class rows, sums and counts of inconsistent shapes")
    if dim is not None and sums.shape[1] != dim:
        raise ContributionError(f"statistics of dimension {sums.shape[1]}, the fleet's is {dim}")
    dim = sums.shape[1]
    if triu.shape != (dim * (dim + 1) // 2,):
        raise ContributionError(f"gram_triu of shape {triu.shape} for statistics of dimension {dim}")
    rows = int(rows_arr[0])
    if not 0 <= rows <= max_rows or (
        len(idx) and (idx.min() < 0 or idx.max() >= rows or len(np.unique(idx)) != len(idx))
    ):
        raise ContributionError(f"class rows outside a table of {rows} rows (at most {max_rows}), or repeated")
    full_sums = np.zeros((rows, dim))
    full_counts = np.zeros(rows, np.int64)
    full_sums[idx] = sums
    full_counts[idx] = counts
    try:
        return RidgeStats.from_arrays({"gram_triu": triu, "class_sums": full_sums, "counts": full_counts})
    except ValueError as exc:
        raise ContributionError(str(exc)) from None


def packed_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def stats_digest(stats: RidgeStats) -> str:
    """sha256 of the float64 statistics: a device checks the global it publishes is the one it scored."""
    h = hashlib.sha256()
    for name, a in sorted(pack_stats(stats, "float64").items()):
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Expected:
    """What every contribution of a round must match: the fleet's base and table, and G's size."""

    base: str  # fingerprint of backbone, preprocessing and projection (fleet.device.base_fingerprint)
    table: str  # the fleet's concept-table fingerprint
    rows: int
    dim: int


@dataclasses.dataclass(frozen=True)
class Contribution:
    """One device's statistics added since its last round, as the coordinator received them."""

    device: str
    base: str
    table: str
    stats: RidgeStats
    contribution_id: str  # the device's id of this upload: the coordinator records which it merged
    wire_bytes: int


def check_contribution(c: Contribution, expected: Expected) -> None:
    """Raise ContributionError naming what does not match (the device is left out of the round)."""
    if c.base != expected.base:
        raise ContributionError(f"base {c.base[:12]} is not the fleet's {expected.base[:12]}")
    if c.table != expected.table:
        raise ContributionError(f"concept table {c.table[:12]} is not the fleet's {expected.table[:12]}")
    if c.stats.dim != expected.dim:
        raise ContributionError(f"statistics of dimension {c.stats.dim}, the fleet's is {expected.dim}")
    if c.stats.rows > expected.rows:
        raise ContributionError(f"statistics over {c.stats.rows} table rows, the fleet's table has {expected.rows}")
