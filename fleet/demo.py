"""``make fleet-demo``: a SuperLink and three SuperNodes as local processes on 127.0.0.1, three
rounds on the embedded Fashion-MNIST sample split across the devices (classes overlap partly),
then the fleet's accuracy matrix. Each round brings every device new images first; the
coordinator's table starts with four class names and the devices ask for the rest."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cvm_edge.concepts import slugify
from cvm_edge.demo import load_sample
from fleet.runtime import free_port

# (device, classes) per round: every device learns something new each round; class 1, 3 and 4 are
# seen by two devices (their images split between them).
PLAN: tuple[dict[str, tuple[int, ...]], ...] = (
    {"shop-a": (0, 1), "shop-b": (2, 3), "shop-c": (4,)},
    {"shop-a": (5,), "shop-b": (6, 1), "shop-c": (7,)},
    {"shop-a": (8,), "shop-b": (9,), "shop-c": (3, 4)},
)
FIRST_CLASSES = 4  # the coordinator's table starts with these; devices ask for the others by name
DEMO_MARKER = ".cvm-fleet-demo"


def _cvm(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cvm_edge.cli", *argv]


def _split(labels: np.ndarray, seed: int = 0) -> dict[tuple[int, str], np.ndarray]:
    """Each (class, device) its own images: a class seen by two devices has its images halved."""
    rng = np.random.default_rng(seed)
    owners: dict[int, list[str]] = {}
    for plan in PLAN:
        for dev, classes in plan.items():
            for c in classes:
                owners.setdefault(c, []).append(dev)
    out = {}
    for c, devs in owners.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, dev in enumerate(devs):
            out[(c, dev)] = np.sort(idx[k :: len(devs)])
    return out


def _write(root: Path, images: np.ndarray, idx: np.ndarray, name: str, tag: str) -> None:
    d = root / slugify(name)
    d.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(idx):
        Image.fromarray(images[i]).save(d / f"{tag}-{k:04d}.png")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workdir", type=Path, default=Path("fleet_demo_work"))
    ap.add_argument("--rounds", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    args = ap.parse_args(argv)
    # A SIGTERM (a test's timeout, a service stop) unwinds through the finally below, which stops the
    # SuperLink and SuperNodes this demo started; the default action would leave them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work: Path = args.workdir
    # Only a folder this demo made is emptied: --workdir . (or any folder of the user's) must not be wiped.
    if work.is_symlink() or (work.exists() and any(work.iterdir()) and not (work / DEMO_MARKER).is_file()):
        print(f"error: {work} exists and is not a fleet demo's workdir; pass a new --workdir", file=sys.stderr)
        return 2
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / DEMO_MARKER).write_text("made by python -m fleet.demo; emptied by the next run\n")
    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    (work / "classes.txt").write_text("\n".join(names[:FIRST_CLASSES]) + "\n")
    table = work / "fleet_table.npz"
    coord = work / "coordinator"
    subprocess.run(
        _cvm("-q", "embed", "build", "--classes", str(work / "classes.txt"), "--out", str(table)), check=True
    )
    subprocess.run(
        _cvm("fleet", "init", "--workdir", str(coord), "--concepts", str(table), "--image-size", str(args.image_size)),
        check=True,
    )
    port = free_port()
    link = f"127.0.0.1:{port}"
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], log: str) -> None:
        with open(logs / log, "wb") as fh:
            procs.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start(_cvm("fleet", "coordinator", "--workdir", str(coord), "--port", str(port)), "superlink.log")
        time.sleep(3)
        devices = sorted(PLAN[0])
        for dev in devices:
            (work / dev / "data").mkdir(parents=True)
            start(
                _cvm(
                    "fleet",
                    "device",
                    "--workdir",
                    str(work / dev / "store"),
                    "--data",
                    str(work / dev / "data"),
                    "--coordinator",
                    link,
                    "--name",
                    dev,
                    "--port",
                    str(free_port()),
                    "--max-forgetting",
                    "15",
                ),
                f"{dev}.log",
            )
        split = _split(sample["train_labels"])
        for rnd, plan in enumerate(PLAN[: args.rounds], start=1):
            print(
                f"\n== round {rnd}: "
                + "; ".join(f"{d} gets {', '.join(names[c] for c in cs)}" for d, cs in plan.items())
            )
            for dev, classes in plan.items():
                for c in classes:
                    _write(work / dev / "data", sample["train_images"], split[(c, dev)], names[c], f"r{rnd}")
            subprocess.run(
                _cvm(
                    "fleet",
                    "run",
                    "--workdir",
                    str(coord),
                    "--coordinator",
                    link,
                    "--rounds",
                    "1",
                    "--min-devices",
                    str(len(devices)),
                    "--timeout-s",
                    str(args.timeout_s),
                    "--wait-s",
                    "60",
                ),
                check=True,
            )
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # the SuperLink's and SuperNodes' own children too
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
    print("\n== the fleet after each round (accuracy on each device's held-out images under the fleet's model)")
    subprocess.run(_cvm("fleet", "status", "--workdir", str(coord)), check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
