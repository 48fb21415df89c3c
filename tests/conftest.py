from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cvm_edge.demo import load_sample, sample_class_names, write_class_folders
from cvm_edge.preprocess import Preprocessing, resize_crop

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
FASHION_NAMES = sample_class_names()


# A stand-in for `cvm`: `update` fails for folders holding a file BAD, else publishes the next checkpoint and
# bundle (LATEST and CURRENT); `export` publishes a bundle for LATEST. Every call is logged.
FAKE_CVM = r"""#!/bin/sh
echo "$*" >> "$CALLS"
cmd=$1; shift
workdir=""; data=""
while [ $# -gt 0 ]; do
    case "$1" in --workdir) workdir=$2; shift ;; --data) data=$2; shift ;; esac
    shift
done
mkdir -p "$workdir/checkpoints" "$workdir/bundles"
if [ "$cmd" = update ]; then
    if [ -e "$data/BAD" ]; then echo "cvm: error: class(es) 'x' are not in the concept table" >&2; exit 1; fi
    n=$(( $(cat "$workdir/n" 2>/dev/null || echo 1) + 1 )); echo $n > "$workdir/n"
    printf 'v%06d\n' $n > "$workdir/checkpoints/LATEST"
    printf 'v%06d\n' $n > "$workdir/bundles/CURRENT"
    echo "published v$n"
elif [ "$cmd" = export ]; then
    cp "$workdir/checkpoints/LATEST" "$workdir/bundles/CURRENT"
    echo "published bundle $(cat "$workdir/bundles/CURRENT")"
fi
"""


def run_cli(*argv: str) -> int:
    from cvm_edge.cli import main

    return main(list(argv))


def sample_pixels(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The sample's grey 28-px images as RGB uint8 at the model's size, as a folder of them would be read."""
    return np.stack([resize_crop(Image.fromarray(a).convert("RGB"), prep) for a in images])


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    return load_sample()


@pytest.fixture(scope="session")
def fashion_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real concept table for the 10 Fashion-MNIST classes, built once with MiniLM."""
    d = tmp_path_factory.mktemp("table")
    (d / "classes.txt").write_text("\n".join(FASHION_NAMES) + "\n")
    assert run_cli("-q", "embed", "build", "--classes", str(d / "classes.txt"), "--out", str(d / "t.npz")) == 0
    return d / "t.npz"


@pytest.fixture()
def class_folders(sample: dict[str, np.ndarray], tmp_path: Path):
    """Factory: write the sample's training images of some classes as an update folder."""

    def make(classes: list[int], per_class: int | None = None, name: str = "data") -> Path:
        images, labels = sample["train_images"], sample["train_labels"]
        if per_class is not None:
            keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
            images, labels = images[keep], labels[keep]
        return write_class_folders(tmp_path / name, images, labels, FASHION_NAMES, classes)

    return make


def update_store(workdir: Path, data: Path, *extra: str) -> int:
    """``cvm -q update`` of ``workdir`` on ``data`` (no progress bar, no ONNX export); the exit code."""
    return run_cli(
        "-q", "update", "--workdir", str(workdir), "--data", str(data), "--no-progress", "--no-export", *extra
    )


def init_store(workdir: Path, table: Path, *extra: str) -> None:
    assert (
        run_cli(
            "-q",
            "init",
            "--workdir",
            str(workdir),
            "--concepts",
            str(table),
            "--backbone",
            "resnet10_cifar_slim",
            "--pretrained",
            "none",
            "--image-size",
            "32",
            *extra,
        )
        == 0
    )


def python() -> str:
    return sys.executable


def cvm_argv(*argv: str) -> list[str]:
    """The argv of a `cvm` command in its own process (this interpreter)."""
    return [sys.executable, "-m", "cvm_edge.cli", *argv]


def table_by_process(folder: Path, names: Sequence[str]) -> Path:
    """The concept table of ``names``, built by `cvm embed build` in its own process (the encoder
    stays out of this one); ``folder/table.npz``."""
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    table = folder / "table.npz"
    subprocess.run(
        cvm_argv("-q", "embed", "build", "--classes", str(folder / "classes.txt"), "--out", str(table)), check=True
    )
    return table


@contextlib.contextmanager
def process_groups() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to append processes started with ``start_new_session=True``; on exit each one's group
    gets SIGTERM, then SIGKILL after 20 s (Flower's processes start children of their own)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def der_context(model: Any) -> Any:
    """A Strategy Context for DER++ loss tests: 12 random 16-px buffer images of classes 0 and 1 with
    random stored logits over 4 rows, classes 2 and 3 arriving, buffer draws from a generator seeded 7
    (``torch.randperm(12, generator=Generator().manual_seed(7))`` repeats them). A replaying plugin
    loads the buffer in its ``before_experience``."""
    import dataclasses

    import torch

    from cvm_edge.buffer import ReplayBuffer
    from cvm_edge.data import ImageSet
    from cvm_edge.preprocess import Preprocessing
    from cvm_edge.strategy import Context, TrainConfig

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 6).astype(np.int64)
    logits = rng.normal(size=(12, 4)).astype(np.float16)
    buffer = dataclasses.replace(
        ReplayBuffer.empty(12, 16), pixels=pixels, labels=labels, logits=logits, tasks=np.zeros(12, np.int32)
    )
    return Context(
        model=model,
        buffer=buffer,
        seen=torch.arange(4),
        old_classes=torch.arange(2),
        current_classes=torch.tensor([2, 3]),
        revisited_classes=torch.zeros(0, dtype=torch.long),
        new_data=ImageSet(pixels[:0], labels[:0]),
        train_inputs=torch.from_numpy(pixels[:0]),
        config=TrainConfig(epochs=1, replay_batch_size=5, augment=False, progress=False, seed=3),
        prep=Preprocessing(16),
        device=torch.device("cpu"),
        cached=False,
        rng=np.random.default_rng(7),
        gen=torch.Generator().manual_seed(7),
        task_index=1,
    )


def render_report(results: Path, protocol: str, work: Path) -> str:
    """BENCHMARKS.md text (no plots) rendered by bench.report from the run JSONs in ``results``,
    filed as one protocol's results under ``work/res``."""
    from bench import report

    proto = work / "res" / protocol
    proto.mkdir(parents=True)
    for f in results.glob("*.json"):
        (proto / f.name).write_text(f.read_text())
    out = work / "B.md"
    assert report.main(["--results", str(work / "res"), "--out", str(out), "--no-plots"]) == 0
    return out.read_text()
