"""Time one ``cvm update`` (``cvm_edge.update.run_update``) on this machine's CPU.

The store starts from the offline ImageNet EfficientNet-Lite0 (``cvm init --pretrained offline``); a
first, untimed update teaches 2 Imagenette classes (100 images each) so the buffer holds old classes;
the timed update, a fresh ``cvm update`` process, then learns 2 new Imagenette classes from an image
folder of their training images (64 px files, upscaled to the model's input size by the update's own
preprocessing), buffer 500, and exports the bundle (``--no-export`` to leave that out). Its wall time
and peak RSS are that process's.

    python -m bench.update --all --image-size 224 --epochs 2     # none, last, all in turn
    python -m bench.update --train-backbone none --image-size 224
    python -m bench.update --train-backbone none --image-size 224 --per-class 250   # ~500 images
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bench.child_rss import MARK
from bench.datasets import REPO, load_dataset
from bench.provenance import git_commit
from bench.run import versions
from bench.tables import table_path
from cvm_edge import vocabulary
from cvm_edge.analytic import DEFAULT_DIM
from cvm_edge.fsutil import atomic_write_text

RESULTS = REPO / "bench" / "results" / "update"
OLD_CLASSES = (0, 1)  # tench, English springer: the untimed first update
NEW_CLASSES = (6, 7)  # garbage truck, gas pump: the timed update


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


def one(
    train_backbone: str,
    image_size: int,
    epochs: int,
    buffer: int,
    threads: int | None,
    per_class: int | None,
    export: bool = True,
    device: str = "cpu",
    learner: str = "gradient",
    analytic_dim: int = DEFAULT_DIM,
) -> dict[str, object]:
    import torch

    from bench.tables import concept_vectors
    from cvm_edge.update import InitOptions, UpdateOptions, init_store, run_update
    from cvm_edge.update_report import status as update_status

    if threads:
        torch.set_num_threads(threads)
    data = load_dataset("imagenette", 64)
    names = list(data.classes)
    concept_vectors(names)  # builds and caches the table file
    work = Path(tempfile.mkdtemp(prefix="cvm-update-bench-"))
    try:
        old_dir, new_dir = work / "old", work / "new"
        write_folder(old_dir, data.train.images, data.train.labels, names, OLD_CLASSES, 100)
        n_new = write_folder(new_dir, data.train.images, data.train.labels, names, NEW_CLASSES, per_class)
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
                learner=learner,
                analytic_dim=analytic_dim,
            ),
        )
        run_update(store, UpdateOptions(data_dir=old_dir, epochs=1, progress=False, force=True, device=device))
        # The timed update is a real `cvm update` process: its peak RSS is that of the command a device
        # runs (imports included), not of this harness, which also holds the whole dataset.
        cmd = [sys.executable, "-m", "cvm_edge.cli", "-q", "update", "--workdir", str(store), "--data", str(new_dir)]
        cmd += ["--epochs", str(epochs), "--force", "--device", device] + ([] if export else ["--no-export"])
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        t0 = time.perf_counter()
        # Through bench.child_rss: a small launcher, so the peak is the command's own and not this
        # harness's (a forked child's ru_maxrss starts at its parent's resident size).
        launcher = [sys.executable, "-m", "bench.child_rss", *cmd]
        proc = subprocess.run(
            launcher, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"cvm update failed ({proc.returncode}): {proc.stderr[-2000:]}")
        measured = json.loads(proc.stderr.rsplit(MARK, 1)[1].splitlines()[0])
        child_peak_mb = measured["peak_rss_kb"] / 1024.0
        e = update_status(store)["history"][-1]
        return {
            "learner": learner,
            "analytic_dim": analytic_dim if learner == "analytic" else None,
            "store_mb": e.get("store_mb"),
            "train_backbone": train_backbone,
            "image_size": image_size,
            "n_images": n_new,
            "n_train": e["n_train"],
            "epochs": epochs,
            "buffer": buffer,
            "export": export,
            "device": device,
            "plugins": e.get("plugins", []),
            "steps": e.get("steps", 0),
            "wall_s": round(wall, 2),
            "update_wall_s": round(float(e["wall_s"]), 2),
            "images_per_s": round(n_new / wall, 2),
            "peak_rss_mb": round(child_peak_mb, 1),
            "new_accuracy": round(100.0 * float(e["new_accuracy"]), 2),
            "old_accuracy": None if e["old_accuracy"] is None else round(100.0 * float(e["old_accuracy"]), 2),
            "new_classes": [names[c] for c in NEW_CLASSES],
            "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
            + (f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""),
            "torch_threads": threads or torch.get_num_threads(),
            "command": " ".join(["python", "-m", "bench.update", *sys.argv[1:]]),
            "timed_command": "cvm update --workdir STORE --data NEW " + " ".join(cmd[cmd.index("--epochs") :]),
            "git_commit": git_commit(),
            "versions": versions(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "note": "first update (2 old classes, 100 images each, 1 epoch) is untimed, in this process; the timed "
            "one is a fresh `cvm update` process (start-up and imports, reading and upscaling the images, "
            "training, evaluation, the atomic checkpoint save"
            + (", the bundle export with its parity gate" if export else "")
            + "); peak RSS is that process's ru_maxrss, read by bench.child_rss (a small launcher: a child forked from this harness would count the harness's resident size too)",
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
    ap.add_argument("--per-class", type=int, default=None, help="new images per class (default: all, ~950)")
    ap.add_argument("--no-export", action="store_true", help="time `cvm update --no-export` (no bundle)")
    ap.add_argument("--device", default="cpu", help="torch device of the update (cpu, cuda)")
    ap.add_argument(
        "--learner",
        default="gradient",
        choices=vocabulary.LEARNERS,
        help="analytic: closed form (frozen backbone)",
    )
    ap.add_argument("--analytic-dim", type=int, default=DEFAULT_DIM, help="analytic: width M of the random projection")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.learner == "analytic" and args.train_backbone != "none":
        ap.error("the analytic learner needs --train-backbone none")
    logging.basicConfig(level=logging.WARNING)
    if args.all:
        rc = 0
        for tb in ("none", "last", "all"):
            cmd = [sys.executable, "-m", "bench.update", "--train-backbone", tb, "--image-size", str(args.image_size)]
            cmd += ["--epochs", str(args.epochs), "--buffer", str(args.buffer), "--out", str(args.out)]
            cmd += ["--per-class", str(args.per_class)] if args.per_class else []
            cmd += ["--no-export"] if args.no_export else []
            cmd += ["--device", args.device]
            rc |= subprocess.run(cmd, check=False).returncode
        return rc
    rec = one(
        args.train_backbone,
        args.image_size,
        args.epochs,
        args.buffer,
        args.threads,
        args.per_class,
        not args.no_export,
        args.device,
        args.learner,
        args.analytic_dim,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    size_tag = f"-n{rec['n_images']}" if args.per_class else ""
    export_tag = ("-noexport" if args.no_export else "") + ("" if args.device == "cpu" else f"-{args.device}")
    dim_tag = f"-m{args.analytic_dim}" if args.analytic_dim != DEFAULT_DIM else ""
    stem = f"lite0-analytic{dim_tag}" if args.learner == "analytic" else f"lite0-{args.train_backbone}"
    epochs_tag = "" if args.learner == "analytic" else f"-e{args.epochs}"
    path = args.out / f"{stem}-{args.image_size}{epochs_tag}{size_tag}{export_tag}.json"
    atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    print(
        f"update train_backbone={args.train_backbone} {args.image_size}px: {rec['wall_s']:.1f}s "
        f"{rec['images_per_s']:.1f} img/s peak RSS {rec['peak_rss_mb']:.0f} MB new acc {rec['new_accuracy']:.1f}% -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
