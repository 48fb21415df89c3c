from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cvm_edge.demo import load_sample, sample_class_names, write_class_folders

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
FASHION_NAMES = sample_class_names()


def run_cli(*argv: str) -> int:
    from cvm_edge.cli import main

    return main(list(argv))


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
