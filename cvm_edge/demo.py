"""``make demo``: five updates of two Fashion-MNIST classes each: the analytic learner (the default on
a pretrained backbone) beside the gradient learner (replay + distillation) and plain fine-tuning, on
the sample that ships inside the package. Runs offline.

The sample (3,000 training and 600 test images, 28x28 grayscale) is cut from Fashion-MNIST as
packaged by Debian (``dataset-fashion-mnist``, MIT licence, Copyright 2017 Zalando SE).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from cvm_edge.cli import main as cvm
from cvm_edge.concepts import slugify
from cvm_edge.evaluate import accuracy_matrix, format_matrix
from cvm_edge.pretrained import default_backbone
from cvm_edge.workdir import layout

SAMPLE = "fashion_mnist_sample.npz"


def load_sample() -> dict[str, np.ndarray]:
    with resources.files("cvm_edge.demo_data").joinpath(SAMPLE).open("rb") as fh, np.load(fh) as z:
        return {k: z[k] for k in z.files}


def sample_class_names() -> list[str]:
    """The sample's class names (index = label), read without decompressing its images."""
    with resources.files("cvm_edge.demo_data").joinpath(SAMPLE).open("rb") as fh, np.load(fh) as z:
        return [str(n) for n in z["classes"]]


def write_class_folders(
    root: Path, images: np.ndarray, labels: np.ndarray, names: Sequence[str], classes: Sequence[int]
) -> Path:
    """Write the images of ``classes`` as PNG files in one slug-named folder per class."""
    if root.exists():
        shutil.rmtree(root)
    for c in classes:
        d = root / slugify(names[c])
        d.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == c)):
            Image.fromarray(images[i]).save(d / f"{k:04d}.png")
    return root


def _run(argv: list[str]) -> None:
    code = cvm(argv)
    if code != 0:
        raise SystemExit(f"demo step failed (exit {code}): cvm {' '.join(argv)}")


def _history(workdir: Path) -> list[dict[str, object]]:
    where = layout(workdir)
    meta = json.loads((where.version_dir(where.latest.read_text().strip()) / "meta.json").read_text())
    return list(meta["history"])


def _final_avg(history: list[dict[str, object]]) -> float:
    row = accuracy_matrix(history)[-1]
    return 100.0 * float(np.mean([v for v in row if v is not None]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workdir", type=Path, default=Path("demo_work"))
    ap.add_argument("--tasks", type=int, default=5, help="updates of two classes each (1-5)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--backbone", default=None, help="default: pretrained Lite0 if installed, else a small ResNet")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--train-backbone", default=None)
    ap.add_argument("--buffer-size", type=int, default=200)
    args = ap.parse_args(argv)
    if args.backbone is None:
        # The offline ImageNet Lite0, frozen, at 64 px: measured 76.8% final accuracy in 1.2 min against
        # 72.0% in 3.5 min for the small ResNet trained from scratch at 32 px (which is the fallback).
        args.backbone, pretrained = default_backbone()
        frozen = pretrained == "offline"
        args.pretrained = args.pretrained or pretrained
        args.image_size = args.image_size or (64 if frozen else 32)
        args.train_backbone = args.train_backbone or ("none" if frozen else "all")
    args.pretrained = args.pretrained or "none"
    args.image_size = args.image_size or 32
    args.train_backbone = args.train_backbone or "all"

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "classes.txt").write_text("\n".join(names) + "\n")
    table = work / "fashion_concepts.npz"
    print("== building the concept table with the bundled all-MiniLM-L6-v2")
    _run(["-q", "embed", "build", "--classes", str(work / "classes.txt"), "--out", str(table)])

    # The gate allows 15 points here: Pullover, Coat and Shirt look alike at 28 px, so some old-class
    # accuracy is honestly lost to confusion with the new classes, not to forgetting.
    # (init flags, update flags, title) per run. The analytic learner (the default on a pretrained
    # backbone) is shown beside the gradient learner and fine-tuning; without pretrained weights the
    # features are random and only the gradient runs are made.
    gradient = [
        "--learner",
        "gradient",
        "--train-backbone",
        args.train_backbone,
        "--buffer-size",
        str(args.buffer_size),
    ]
    epochs = ["--epochs", str(args.epochs)]
    runs: dict[str, tuple[list[str], list[str], str]] = {
        "analytic": (
            ["--learner", "analytic"],
            ["--max-forgetting", "15"],
            "analytic learner (closed form, no images kept)",
        ),
        "cvm": (
            gradient,
            ["--plugins", "replay,distill", "--max-forgetting", "15", *epochs],
            "CVM gradient learner, replay + distillation",
        ),
        "finetune": (gradient, ["--plugins", "none", "--force", *epochs], "fine-tuning, no plugins (lower bound)"),
    }
    if args.pretrained == "none":
        del runs["analytic"]
    for run, (init_flags, _, _) in runs.items():
        _run(
            [
                "-q",
                "init",
                "--workdir",
                str(work / run),
                "--concepts",
                str(table),
                "--backbone",
                args.backbone,
                "--pretrained",
                args.pretrained,
                "--image-size",
                str(args.image_size),
                *init_flags,
            ]
        )

    for t in range(args.tasks):
        classes = [2 * t, 2 * t + 1]
        data = write_class_folders(
            work / "data" / f"task{t + 1}", sample["train_images"], sample["train_labels"], names, classes
        )
        print(f"\n== update {t + 1}: {names[classes[0]]}, {names[classes[1]]}")
        for run, (_, update_flags, _) in runs.items():
            _run(["-q", "update", "--workdir", str(work / run), "--data", str(data), "--no-progress", *update_flags])
        for run, (_, _, title) in runs.items():
            print(
                format_matrix(accuracy_matrix(_history(work / run)), f"-- {title}: accuracy (%) per update's classes")
            )

    from cvm_edge.plots import plot_accuracy_matrices

    plot_accuracy_matrices(
        {title: accuracy_matrix(_history(work / run)) for run, (_, _, title) in runs.items()},
        work / "accuracy.png",
        "Fashion-MNIST sample, 5 updates of 2 classes",
    )
    print(f"\n== accuracy matrices and curves plotted to {work / 'accuracy.png'}")
    finals = ", ".join(f"{run} {_final_avg(_history(work / run)):.1f}%" for run in runs)
    print(f"\n== final average accuracy over all {2 * args.tasks} classes: {finals}")
    best = "analytic" if "analytic" in runs else "cvm"

    pred_dir = work / "predict"
    pred_dir.mkdir()
    picks = [int(np.flatnonzero(sample["test_labels"] == c)[0]) for c in range(0, 2 * args.tasks, 3)]
    files = []
    for i in picks:
        f = pred_dir / f"test_{i:03d}_{slugify(names[int(sample['test_labels'][i])])}.png"
        Image.fromarray(sample["test_images"][i]).save(f)
        files.append(str(f))
    print("\n== cvm predict on held-out test images (file names carry the true class)")
    subprocess.run(
        [sys.executable, "-m", "cvm_edge.cli", "-q", "predict", "--workdir", str(work / best), "--top-k", "2", *files],
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
