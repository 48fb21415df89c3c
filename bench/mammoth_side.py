"""Mammoth (aimagelab/mammoth, the DER authors' framework) beside our harness on cifar10-5 (issue 20).

Three steps, none of which copies Mammoth's code into the project (it is run from a copy of its
repository carried to the machine as files):

    python -m bench.mammoth_side convert --seed 0 --out /tmp/mm-data/s0
        our CIFAR-10 copy (the JPEG pixels every harness run trains on) in torchvision's on-disk
        format under OUT/CIFAR10/cifar-10-batches-py, relabelled so that Mammoth's fixed class
        order 0..9 is our seeded order for SEED: Mammoth's task t is our task t.
    python -m bench.mammoth_side run --mammoth /tmp/mammoth --data /tmp/mm-data/s0 -- --model derpp ...
        Mammoth's main.py in its copy, with torchvision's CIFAR-10 md5 check answered "intact"
        (converted files cannot match the md5 of the originals; nothing is downloaded).
    python -m bench.mammoth_side collect --logs /tmp/mm-data/s0/results/class-il/seq-cifar10/derpp/logs.pyd \\
        --seed 0 --buffer 500 --epochs 5 --commit e75a491 --args "..." --out bench/results/cifar10-5
        Mammoth's accuracy matrix as our result JSON (method ``mammoth-derpp`` / ``mammoth-er``),
        with Mammoth's commit and arguments, so that bench.report shows it beside ours.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import pickle
import re
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import provenance
from bench.datasets import load_dataset, per_class_subset
from bench.metrics import forgetting_per_task, summarise
from bench.protocols import PROTOCOLS, class_order

BATCHES = "cifar-10-batches-py"
MAMMOTH_METHODS = {"derpp": "mammoth-derpp", "er": "mammoth-er"}


def relabelling(seed: int) -> np.ndarray:
    """``new[c]``: Mammoth's label for our class ``c``, so that Mammoth's classes 2t and 2t + 1
    (its task t) are our seeded task t (``bench.protocols.build_scenario``'s order)."""
    order = class_order(10, seed)
    new = np.empty(10, np.int64)
    new[np.asarray(order)] = np.arange(10)
    return new


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One torchvision CIFAR-10 pickle: ``data`` uint8 [N, 3072] (channel-major rows), ``labels``."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump({"data": data, "labels": [int(v) for v in labels], "batch_label": path.name}, f)
    tmp.replace(path)


def convert(seed: int, out: Path, train_per_class: int | None = None, test_per_class: int | None = None) -> Path:
    """Our CIFAR-10 train and test splits in torchvision's format, relabelled for ``seed``; cut to
    the same per-class subsets as ``bench.run --train-per-class / --test-per-class`` (CPU probes)."""
    ds = load_dataset("cifar10", 32)
    if train_per_class is not None or test_per_class is not None:
        ds = dataclasses.replace(
            ds,
            train=ds.train if train_per_class is None else per_class_subset(ds.train, train_per_class, seed),
            test=ds.test if test_per_class is None else per_class_subset(ds.test, test_per_class, seed + 1),
        )
    new = relabelling(seed)
    root = out / "CIFAR10" / BATCHES
    root.mkdir(parents=True, exist_ok=True)
    train_labels = new[ds.train.labels]
    # torchvision reads five training batches in order; any split of the rows into five works.
    for k, idx in enumerate(np.array_split(np.arange(len(ds.train)), 5)):
        _write_batch(root / f"data_batch_{k + 1}", ds.train.images[idx], train_labels[idx])
    _write_batch(root / "test_batch", ds.test.images, new[ds.test.labels])
    names = [ds.classes[c] for c in class_order(10, seed)]  # Mammoth's class k is our class order[k]
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": len(ds.train) // 5, "num_vis": 3072}, f)
    (out / "relabelling.json").write_text(
        json.dumps({"seed": seed, "ours_to_mammoth": new.tolist(), "class_names": names}) + "\n"
    )
    return root


def trust_converted_cifar() -> None:
    """Make torchvision's CIFAR-10 accept converted files: they cannot carry the originals' md5
    sums, and a failed check would try to download (this process only)."""
    import torchvision.datasets
    import torchvision.datasets.cifar

    torchvision.datasets.CIFAR10._check_integrity = lambda self: True  # type: ignore[method-assign]
    torchvision.datasets.cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


def run_mammoth(mammoth: Path, data: Path, args: Sequence[str]) -> None:
    """Mammoth's main.py from its copy, reading ``data`` (``--base_path``), md5 check bypassed."""
    trust_converted_cifar()
    os.chdir(mammoth)
    sys.path.insert(0, str(mammoth))
    sys.argv = ["main.py", "--base_path", str(data), *args]
    runpy.run_path(str(mammoth / "main.py"), run_name="__main__")


def parse_logs(path: Path, seed: int) -> dict[str, Any]:
    """The last line of Mammoth's ``logs.pyd`` (one dict per run) whose seed is ``seed``."""
    found = None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            # values such as devices or namespaces are not literals: keep the numbers and strings
            rec = {
                k: ast.literal_eval(v)
                for k, v in re.findall(r"'([A-Za-z0-9_]+)': ('[^']*'|-?[0-9.eE+-]+|None|True|False)", line)
            }
        if rec.get("seed") == seed:
            found = rec
    if found is None:
        raise SystemExit(f"{path}: no run with seed {seed}")
    return found


def accuracy_matrix(rec: dict[str, Any], n_tasks: int = 5) -> list[list[float | None]]:
    """``a[i][j]``: accuracy on task j after task i (Mammoth's ``accuracy_{j+1}_task{i+1}``)."""
    return [
        [round(float(rec[f"accuracy_{j + 1}_task{i + 1}"]), 3) if j <= i else None for j in range(n_tasks)]
        for i in range(n_tasks)
    ]


def collect(
    logs: Path,
    seed: int,
    buffer: int,
    epochs: int,
    commit: str,
    args: str,
    out: Path,
    tag: str = "",
    device: str = "cuda",
    wall_s: float = 0.0,
) -> Path:
    rec = parse_logs(logs, seed)
    model = str(rec.get("model", logs.parent.name))
    if model not in MAMMOTH_METHODS:
        raise SystemExit(f"{logs}: model {model!r} is not one of {sorted(MAMMOTH_METHODS)}")
    method = MAMMOTH_METHODS[model]
    matrix = accuracy_matrix(rec)
    order = class_order(10, seed)
    record: dict[str, Any] = {
        "protocol": PROTOCOLS["cifar10-5"].name,
        "method": method,
        "method_description": f"Mammoth's own {model} (aimagelab/mammoth at {commit}), run on our CIFAR-10 copy",
        "buffer": buffer,
        "seed": seed,
        "tag": tag,
        **{k: (None if v is None else round(v, 3)) for k, v in summarise(matrix).items()},
        "acc_matrix": matrix,
        "forgetting_per_task": forgetting_per_task(matrix),
        "tasks": [order[i : i + 2] for i in range(0, 10, 2)],
        "wall_s": round(wall_s, 2),
        "images_per_s": 0.0,  # not measured on Mammoth's side
        "peak_memory": {"rss_mb": 0.0},
        "device": device,
        "machine": provenance.machine(),
        "hyperparameters": {
            "epochs": epochs,
            # the fields bench.report groups by; Mammoth's resnet18 is our resnet18_cifar's layout
            "model": {"backbone": "mammoth resnet18", "train_backbone": "all", "image_size": 32, "head": "linear"},
            "cuda_graph": False,
            "amp_bf16": False,
            "mammoth_commit": commit,
            "mammoth_args": args,
            **{k: rec[k] for k in ("lr", "batch_size", "minibatch_size", "alpha", "beta", "optimizer") if k in rec},
        },
        "data": "our CIFAR-10 copy converted by bench.mammoth_side convert (relabelled: Mammoth's task t is ours)",
        "mammoth_logs": str(logs),
        "command": provenance.command_line("python -m bench.mammoth_side", sys.argv[1:]),
        "git_commit": provenance.git_commit(),
        "date": provenance.utc_now(),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{method}{tag}-b{buffer}-s{seed}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mammoth_side", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="our CIFAR-10 in Mammoth's format, relabelled for a seed")
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--train-per-class", type=int, default=None)
    c.add_argument("--test-per-class", type=int, default=None)
    r = sub.add_parser("run", help="Mammoth's main.py from a copy, on converted data (arguments after --)")
    r.add_argument("--mammoth", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("args", nargs=argparse.REMAINDER)
    k = sub.add_parser("collect", help="Mammoth's logs.pyd as our result JSON")
    k.add_argument("--logs", type=Path, required=True)
    k.add_argument("--seed", type=int, required=True)
    k.add_argument("--buffer", type=int, required=True)
    k.add_argument("--epochs", type=int, required=True)
    k.add_argument("--commit", required=True)
    k.add_argument("--args", required=True, help="Mammoth's command-line arguments, recorded as they were")
    k.add_argument("--tag", default="")
    k.add_argument("--device", default="cuda")
    k.add_argument("--wall-s", type=float, default=0.0, help="the Mammoth run's wall time, if measured")
    k.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "convert":
        print(convert(a.seed, a.out, a.train_per_class, a.test_per_class))
    elif a.cmd == "run":
        run_mammoth(a.mammoth, a.data, [x for x in a.args if x != "--"])
    else:
        print(collect(a.logs, a.seed, a.buffer, a.epochs, a.commit, a.args, a.out, a.tag, a.device, a.wall_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
