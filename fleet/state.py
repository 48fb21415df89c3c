"""Ridge statistics and small JSON records kept under a workdir's ``fleet/`` folder, written
atomically and verified when read back (regular files only, shapes and values checked)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cvm_edge.analytic import RidgeStats
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import atomic_write_bytes, atomic_write_json, read_regular
from fleet.wire import ContributionError, pack_stats, unpack_stats

FLEET_DIR = "fleet"
MAX_STATS_BYTES = 1 << 31  # M = 8,192 in float64 is 268 MB: far above any edge projection
MAX_JSON_BYTES = 1 << 20


def fleet_dir(workdir: Path) -> Path:
    return Path(workdir) / FLEET_DIR


def save_stats(path: Path, stats: RidgeStats) -> None:
    buf = io.BytesIO()
    np.savez(buf, **pack_stats(stats, "float64"))  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: Path) -> RidgeStats | None:
    """The statistics at ``path``, None when there is no file; a damaged file raises StoreError."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        with np.load(io.BytesIO(read_regular(path, MAX_STATS_BYTES)), allow_pickle=False) as z:
            return unpack_stats({k: z[k] for k in z.files})
    except (ContributionError, ValueError, OSError) as exc:
        raise StoreError(f"{path} is damaged: {exc}") from None


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def load_json(path: Path) -> Any:
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return json.loads(read_regular(path, MAX_JSON_BYTES))
    except (ValueError, OSError) as exc:
        raise StoreError(f"{path} is damaged: {exc}") from None


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
