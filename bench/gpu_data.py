"""Copy the datasets a protocol reads into a folder small enough to carry to a GPU machine.

Runs there read ``$CVM_BENCH_DATA``. A protocol with ``max_train_per_class`` only ever uses the
first N training images of each class (file order), so the copy keeps exactly those and the
results are the same as on the full files; test splits are copied whole.

    python -m bench.gpu_data --protocol multidomain-30 --out .devdata/data
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.datasets import TEST_SPLIT_NAMES, data_root, first_per_class_indices
from bench.protocols import PROTOCOLS
from cvm_edge.fsutil import atomic_write_bytes


def _subset_npz(src: Path, dst: Path, per_class: int) -> None:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    keep = first_per_class_indices(arrays["labels"], per_class)
    out: dict[str, np.ndarray] = {}
    if "jpeg" in arrays:  # packed JPEG: cut the byte blob along the kept images' offsets
        blob, offsets = arrays.pop("jpeg"), arrays.pop("offsets")
        parts = [blob[offsets[i] : offsets[i + 1]] for i in keep]
        out["jpeg"] = np.concatenate(parts) if parts else blob[:0]
        out["offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(offsets.dtype)
    n = len(arrays["labels"])
    for k, v in arrays.items():
        out[k] = v[keep] if v.shape[:1] == (n,) else v
    tmp = dst.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)  # type: ignore[arg-type]
    atomic_write_bytes(dst, tmp.read_bytes())
    tmp.unlink()


def copy_protocol_data(protocol_name: str, out: Path) -> list[Path]:
    protocol = PROTOCOLS[protocol_name]
    root = data_root()
    if root is None:
        raise SystemExit("no data root: set CVM_BENCH_DATA or place ../shared/data beside the checkout")
    written = []
    for name in protocol.datasets:
        src, dst = root / name, out / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix != ".npz":
                shutil.copy2(f, dst / f.name)
        for split in ("train", *TEST_SPLIT_NAMES):
            f = src / f"{split}.npz"
            if not f.is_file():
                continue
            if split == "train" and protocol.max_train_per_class is not None:
                _subset_npz(f, dst / f.name, protocol.max_train_per_class)
            else:
                shutil.copy2(f, dst / f.name)
            written.append(dst / f.name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_data", description=__doc__.splitlines()[0] if __doc__ else None
    )
    ap.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for p in copy_protocol_data(args.protocol, args.out):
        print(f"{p} {p.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
