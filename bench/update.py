"""Time one ``cvm update`` (``cvm_edge.update.run_update``) on this machine's CPU.

The store starts from the offline ImageNet EfficientNet-Lite0 (``cvm init --pretrained offline``); a
first, untimed update teaches 2 Imagenette classes (100 images each) so the buffer holds old classes;
the timed update then learns 2 new Imagenette classes from an image folder of all their training
images (64 px files, upscaled to the model's input size by the update's own preprocessing), buffer 500.
Each train_backbone setting runs in its own process so its peak RSS is its own.

    python -m bench.update --all --image-size 224 --epochs 2     # none, last, all in turn
    python -m bench.update --train-backbone none --image-size 224
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bench.datasets import REPO, load_dataset
from bench.run import git_commit, versions
from bench.tables import table_path
from cvm_edge.fsutil import atomic_write_text

RESULTS = REPO / "bench" / "results" / "update"
OLD_CLASSES = (0, 1)  # tench, English springer: the untimed first update
NEW_CLASSES = (6, 7)  # garbage truck, gas pump: the timed update


class RssSampler:
    """Peak resident set size of this process, sampled from /proc every 50 ms."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._read())
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_folder(
    root: Path,
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    classes: Sequence[int],
    per_class: int | None,
) -> int:
    from cvm_edge.concepts import slugify

    n = 0
    for c in classes:
        d = root / slugify(names[c])
        d.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(labels == c)[:per_class]
        for k, i in enumerate(idx):
            Image.fromarray(images[i]).save(d / f"{k:05d}.png")
        n += len(idx)
    return n


def one(train_backbone: str, image_size: int, epochs: int, buffer: int, threads: int | None) -> dict[str, object]:
    import torch

    from bench.tables import concept_vectors
    from cvm_edge.update import InitOptions, UpdateOptions, init_store, run_update

    if threads:
        torch.set_num_threads(threads)
    data = load_dataset("imagenette", 64)
    names = list(data.classes)
    concept_vectors(names)  # builds and caches the table file
    work = Path(tempfile.mkdtemp(prefix="cvm-update-bench-"))
    try:
        old_dir, new_dir = work / "old", work / "new"
        write_folder(old_dir, data.train.images, data.train.labels, names, OLD_CLASSES, 100)
        n_new = write_folder(new_dir, data.train.images, data.train.labels, names, NEW_CLASSES, None)
        store = work / "store"
        init_store(
            store,
            InitOptions(
                concepts=table_path(names),
                backbone="tf_efficientnet_lite0",
                image_size=image_size,
                train_backbone=train_backbone,
                pretrained="offline",
                buffer_size=buffer,
            ),
        )
        run_update(store, UpdateOptions(data_dir=old_dir, epochs=1, progress=False, force=True))
        t0 = time.perf_counter()
        with RssSampler() as rss:
            report = run_update(store, UpdateOptions(data_dir=new_dir, epochs=epochs, progress=False, force=True))
        wall = time.perf_counter() - t0
        e = report.entry
        return {
            "train_backbone": train_backbone,
            "image_size": image_size,
            "n_images": n_new,
            "n_train": e["n_train"],
            "epochs": epochs,
            "buffer": buffer,
            "plugins": e["plugins"],
            "steps": e["steps"],
            "wall_s": round(wall, 2),
            "images_per_s": round(float(e["images_per_s"]), 2),
            "peak_rss_mb": round(max(rss.peak_kb, 0) / 1024.0, 1),
            "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            "new_accuracy": round(100.0 * float(e["new_accuracy"]), 2),
            "old_accuracy": None if e["old_accuracy"] is None else round(100.0 * float(e["old_accuracy"]), 2),
            "new_classes": [names[c] for c in NEW_CLASSES],
            "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
            "torch_threads": torch.get_num_threads(),
            "command": " ".join(["python", "-m", "bench.update", *sys.argv[1:]]),
            "git_commit": git_commit(),
            "versions": versions(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "note": "first update (2 old classes, 100 images each, 1 epoch) is untimed; the timed one includes "
            "reading and upscaling the images, training, evaluation and the atomic checkpoint save",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.update", description=__doc__.splitlines()[0] if __doc__ else None
    )
    ap.add_argument("--train-backbone", default="none", choices=("none", "last", "all"))
    ap.add_argument("--all", action="store_true", help="run none, last and all, each in its own process")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.all:
        rc = 0
        for tb in ("none", "last", "all"):
            cmd = [sys.executable, "-m", "bench.update", "--train-backbone", tb, "--image-size", str(args.image_size)]
            cmd += ["--epochs", str(args.epochs), "--buffer", str(args.buffer), "--out", str(args.out)]
            rc |= subprocess.run(cmd, check=False).returncode
        return rc
    rec = one(args.train_backbone, args.image_size, args.epochs, args.buffer, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lite0-{args.train_backbone}-{args.image_size}-e{args.epochs}.json"
    atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    print(
        f"update train_backbone={args.train_backbone} {args.image_size}px: {rec['wall_s']:.1f}s "
        f"{rec['images_per_s']:.1f} img/s peak RSS {rec['peak_rss_mb']:.0f} MB new acc {rec['new_accuracy']:.1f}% -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
