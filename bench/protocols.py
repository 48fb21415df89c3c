"""Named continual-learning protocols and the seeded scenarios they produce.

Class-incremental protocols bring new classes in every task. Domain-incremental ones (``domains``
set) bring the same classes in every task, each time through another domain shift of
:mod:`bench.domains` (applied to that task's training images and to domain j's test images)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bench.datasets import Dataset, Split, demo_dataset, first_per_class_indices, load_dataset, per_class_subset
from bench.domains import SHIFTS


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    datasets: tuple[str, ...]  # learned one after the other (multi-domain when several)
    image_size: int
    classes_per_task: int
    backbone: str = "resnet18_cifar"
    pretrained: str = "none"  # none | offline (ImageNet EfficientNet-Lite0)
    train_backbone: str = "all"
    epochs: int = 50
    batch_size: int = 32
    # Training images kept per class of each dataset (the first N in file order), None for all.
    max_train_per_class: int | None = None
    # Domain-incremental: one task per domain (bench.domains.SHIFTS names), every task all classes.
    domains: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        unknown = [d for d in self.domains if d not in SHIFTS]
        if unknown:
            raise ValueError(f"protocol {self.name}: unknown domain(s) {unknown}; known: {', '.join(SHIFTS)}")


LITERATURE = "Buzzega et al. 2020 (DER), Table 2 protocol: reduced ResNet-18 from scratch, SGD, batch 32 + 32 replayed"

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("cifar10-5", ("cifar10",), 32, 2, note=LITERATURE),
        Protocol("fmnist-5", ("fashion_mnist",), 32, 2, epochs=10, note="Fashion-MNIST 28 px padded to 32 px RGB"),
        Protocol("imagenette-5", ("imagenette",), 64, 2, epochs=50, note="Imagenette at 64 px, from scratch"),
        Protocol(
            "imagenette-5-lite0",
            ("imagenette",),
            128,
            2,
            backbone="tf_efficientnet_lite0",
            pretrained="offline",
            train_backbone="none",
            epochs=10,
            note="edge protocol (issue 8): ImageNet EfficientNet-Lite0, 64 px images upscaled",
        ),
        # Edge protocols of the analytic learner (issue 17): frozen offline Lite0, frozen-feature methods
        # (bench.frozen) beside the gradient ones on the same backbone.
        Protocol(
            "fmnist-5-lite0",
            ("fashion_mnist",),
            64,
            2,
            backbone="tf_efficientnet_lite0",
            pretrained="offline",
            train_backbone="none",
            epochs=10,
            note="the demo's setting: Fashion-MNIST, frozen ImageNet Lite0 at 64 px",
        ),
        Protocol(
            "gtsrb-lite0",
            ("gtsrb",),
            128,
            9,
            backbone="tf_efficientnet_lite0",
            pretrained="offline",
            train_backbone="none",
            epochs=10,
            note="GTSRB's 43 traffic-sign classes in 5 tasks (9, 9, 9, 9, 7), 32 px images upscaled, frozen Lite0",
        ),
        Protocol(
            "cifar10-5-lite0",
            ("cifar10",),
            224,
            2,
            backbone="tf_efficientnet_lite0",
            pretrained="offline",
            train_backbone="none",
            epochs=10,
            note="CIFAR-10 upscaled to 224 px through the frozen ImageNet Lite0",
        ),
        Protocol(
            "cifar10-domains",
            ("cifar10",),
            32,
            10,
            epochs=10,
            max_train_per_class=1000,
            domains=("clean", "greyscale", "low-light", "blur", "jpeg"),
            note="domain-incremental (MLLM-CL's domain track, issue 7 item 5): all 10 CIFAR-10 classes on clean "
            "images, then greyscale, low light, Gaussian blur and JPEG artefacts (bench/domains.py, fixed seeds); "
            "the first 1,000 training images per class in every domain; a[i][j] on domain j's full test set",
        ),
        Protocol(
            "multidomain-30",
            ("cifar10", "fashion_mnist", "imagenette"),
            32,
            5,
            epochs=10,
            max_train_per_class=1000,
            note="CIFAR-10, then Fashion-MNIST, then Imagenette, all 32x32 RGB: 30 classes in 6 tasks of 5; "
            "the first 1,000 training images of each class (Imagenette has ~950), so no domain dominates by count",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    protocol: Protocol
    class_names: tuple[str, ...]  # table rows
    train: Split
    test: Split
    tasks: tuple[tuple[int, ...], ...]  # table rows trained by each task, in order
    sources: tuple[str, ...]  # dataset names actually read
    domains: tuple[str, ...] = ()  # the domain of each task (domain-incremental protocols), else empty

    @property
    def class_order(self) -> list[int]:
        return [c for t in self.tasks for c in t]


def class_order(n_classes: int, seed: int) -> list[int]:
    """The seeded order in which a dataset's classes arrive."""
    return [int(c) for c in np.random.default_rng(seed).permutation(n_classes)]


def _merge(datasets: Sequence[Dataset]) -> tuple[tuple[str, ...], Split, Split, list[list[int]]]:
    names: list[str] = []
    trains, tests, groups = [], [], []
    for d in datasets:
        off = len(names)
        names += [n for n in d.classes]
        trains.append(Split(d.train.images, d.train.labels + off))
        tests.append(Split(d.test.images, d.test.labels + off))
        groups.append(list(range(off, off + len(d.classes))))
    cat = lambda parts: Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))  # noqa: E731
    return tuple(names), cat(trains), cat(tests), groups


def build_scenario(
    protocol: Protocol,
    seed: int,
    image_size: int | None = None,
    n_tasks: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    use_demo: bool = False,
) -> Scenario:
    """Load the protocol's data and split its classes into tasks in a seeded order (classes of
    each dataset are shuffled with ``seed``; datasets keep their protocol order)."""
    size = image_size or protocol.image_size
    datasets = [demo_dataset(size)] if use_demo else [load_dataset(n, size) for n in protocol.datasets]
    if protocol.max_train_per_class is not None:
        cap = protocol.max_train_per_class
        datasets = [
            dataclasses.replace(d, train=d.train.take(first_per_class_indices(d.train.labels, cap))) for d in datasets
        ]
    names, train, test, groups = _merge(datasets)
    if train_per_class is not None:
        train = per_class_subset(train, train_per_class, seed)
    if test_per_class is not None:
        test = per_class_subset(test, test_per_class, seed + 1)
    tasks: list[tuple[int, ...]] = []
    k = protocol.classes_per_task
    if protocol.domains:
        # Every task trains every class; what changes is the domain (the order is the protocol's).
        tasks = [tuple(range(len(names)))] * len(protocol.domains)
    else:
        for g, group in enumerate(groups):
            order = [group[i] for i in class_order(len(group), seed + 1000 * g)]
            tasks += [tuple(order[i : i + k]) for i in range(0, len(order), k)]
    if n_tasks is not None:
        tasks = tasks[:n_tasks]
    domains = protocol.domains[: len(tasks)]
    return Scenario(protocol, names, train, test, tuple(tasks), tuple(d.name for d in datasets), domains)
