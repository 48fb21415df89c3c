"""Fleet benchmark (issue 21) in Flower's simulation runtime: N simulated devices, non-IID (each
sees a few classes; classes overlap between devices), frozen Lite0 features from bench.frozen's
cache, the product's ServerApp (fleet.app) on a real coordinator store, and feature-level devices
that run the same round steps. Beside the fleet's model, on the protocol's test images:
- centralised: the product's analytic learner on the union of the devices' images in one pass
  (lambda on the union of their held-out images), the figure the fleet must equal;
- each device alone, and the best single device.
Also bytes per device per round, and wall time.

    python -m bench.fleet --protocol imagenette-5-lite0 --image-size 224 --devices 10 --out bench/results/fleet
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import provenance
from bench.frozen import HOLDOUT, extract
from bench.protocols import PROTOCOLS, build_scenario
from bench.tables import concept_vectors, table_path
from cvm_edge import analytic_learner as al
from cvm_edge.analytic import HeldOut, RidgeStats
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet, holdout_split
from cvm_edge.fsutil import atomic_write_text
from cvm_edge.loading import model_from_checkpoint
from cvm_edge.update import InitOptions
from fleet.app import make_client_app, make_server_app
from fleet.base import base_fingerprint
from fleet.coordinator import init_coordinator
from fleet.device import Upload, tally
from fleet.merge import Votes
from fleet.settings import FleetSettings
from fleet.wire import pack_stats

log = logging.getLogger(__name__)


def partition(labels: np.ndarray, n_devices: int, classes_per_device: int, seed: int) -> list[np.ndarray]:
    """Each device's image indices: every class goes to at least one device, each device holds
    ``classes_per_device`` classes, and a class held by k devices has its images split k ways."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    holds: list[set[int]] = [set() for _ in range(n_devices)]
    for i, c in enumerate(rng.permutation(classes)):
        holds[i % n_devices].add(int(c))
    for h in holds:
        extra = [int(c) for c in rng.permutation(classes) if int(c) not in h]
        h.update(extra[: max(0, classes_per_device - len(h))])
    owners = {int(c): [d for d in range(n_devices) if int(c) in holds[d]] for c in classes}
    parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    for c, devs in owners.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, d in enumerate(devs):
            parts[d].append(idx[k :: len(devs)])
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclasses.dataclass
class FeatureDevice:
    """A simulated device: its images' frozen features, split into train and held-out like ``cvm
    update`` splits a folder; it uploads its statistics once (round 1) and tallies its held-out."""

    model: Any
    targets: str
    base: str
    table: ConceptTable
    train: ImageSet
    held: HeldOut
    sent: bool = False

    def sync(self, base: dict[str, Any], table: ConceptTable, merged_id: str | None) -> list[str]:
        return []

    def learn(self, table: ConceptTable) -> dict[str, Any] | None:
        return None

    def upload(self, wire_dtype: str, table: ConceptTable) -> Upload:
        dim = al.analytic_mapper(self.model).projection.shape[1]
        stats = RidgeStats.empty(int(dim), len(self.table.names))
        if not self.sent:
            stats = stats.add(al.lifted(self.model, self.train.pixels), self.train.labels)
            self.sent = True
        return Upload(
            pack_stats(stats, wire_dtype), f"{id(self)}-{self.sent}", self.base, self.table.fingerprint, len(self.train)
        )

    def score(self, fleet: RidgeStats, table: ConceptTable, grid: tuple[float, ...]) -> Votes:
        return tally(self.model, table, self.targets, fleet, self.held, grid)

    def publish(
        self, digest: str, relative_lambda: float, merged: bool, table: ConceptTable, entry: dict[str, Any]
    ) -> dict[str, Any]:
        return {"version": None}


def load_features(protocol_name: str, size: int, seed: int) -> tuple[Any, np.ndarray, np.ndarray, list[str]]:
    """The protocol's frozen Lite0 features (bench.frozen's cache), labels and class names; the
    concept table of those names is built into the bench cache when missing."""
    from cvm_edge.pretrained import load_pretrained_backbone

    protocol = PROTOCOLS[protocol_name]
    scenario = build_scenario(protocol, seed, image_size=size)
    backbone, prep, name = load_pretrained_backbone(protocol.backbone, "offline", size)
    feats = extract(backbone, name, prep, scenario, "cpu", size)
    names = list(scenario.class_names)
    concept_vectors(names)
    return feats, scenario.train.labels, scenario.test.labels, names


def _device_data(feats: np.ndarray, labels: np.ndarray, idx: np.ndarray, seed: int) -> tuple[ImageSet, HeldOut]:
    tr, va = holdout_split(ImageSet(feats[idx], labels[idx]), HOLDOUT, seed)
    return tr, HeldOut.empty(feats.shape[1]).added(va.pixels, va.labels, 1)


def _accuracy(model: Any, feats: np.ndarray, labels: np.ndarray, seen: Sequence[int]) -> float:
    return float((al.predict_rows(model, feats, seen) == labels).mean())


def _alone(model: Any, table: np.ndarray, train: ImageSet, held: HeldOut) -> Any:
    """The product's analytic learner on one device's (or the union's) images, in one update."""
    state = al.AnalyticState.empty(model)
    seen = sorted({int(c) for c in train.labels})
    learned = al.learn(model, table, state, train.pixels, train.labels, held.features, held.labels, seen, 1)
    return learned, seen


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from flwr.simulation import run_simulation

    protocol = PROTOCOLS[args.protocol]
    size = args.image_size or protocol.image_size
    feats, ytr, yte, names = load_features(args.protocol, size, args.seed)
    work = Path(tempfile.mkdtemp(prefix="cvm-fleet-bench-"))
    coord = work / "coordinator"
    init_coordinator(
        coord,
        InitOptions(
            concepts=table_path(names),
            backbone=protocol.backbone,
            image_size=size,
            train_backbone="none",
            pretrained="offline",
            seed=args.seed,
            learner="analytic",
            analytic_dim=args.dim,
            analytic_targets=args.targets,
        ),
    )
    ckpt = CheckpointStore(coord).load()
    table = ckpt.table
    model = model_from_checkpoint(ckpt)
    base = base_fingerprint(ckpt)
    parts = partition(ytr, args.devices, args.classes_per_device, args.seed)
    devices = []
    for d, idx in enumerate(parts):
        tr, held = _device_data(feats.train, ytr, idx, args.seed + d)
        devices.append(FeatureDevice(model, args.targets, base, table, tr, held))

    def device_of(ctx: Any) -> tuple[str, FeatureDevice]:
        d = int(ctx.node_config["partition-id"])  # Flower's simulation numbers its SuperNodes 0..N-1
        return f"device-{d:03d}", devices[d]

    client = make_client_app(device_of)
    settings = FleetSettings(
        workdir=coord,
        rounds=args.rounds,
        min_devices=args.devices,
        quorum=1.0,
        wire_dtype=args.wire_dtype,
        wait_s=600,
        timeout_s=args.timeout_s,
    )
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_simulation(
        make_server_app(settings),
        client,
        num_supernodes=args.devices,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.cpus}},
    )
    fleet_wall = time.perf_counter() - t0
    torch.set_num_threads(args.cpus)
    rounds = json.loads((coord / "fleet" / "rounds.json").read_text())
    fleet_model = model_from_checkpoint(CheckpointStore(coord).load())
    seen = sorted({int(c) for c in ytr})
    fleet_acc = _accuracy(fleet_model, feats.test, yte, seen)
    # centralised: the union of every device's train and held-out split, one update
    union_train = ImageSet(
        np.concatenate([d.train.pixels for d in devices]), np.concatenate([d.train.labels for d in devices])
    )
    union_held = HeldOut(
        np.concatenate([d.held.features for d in devices]),
        np.concatenate([d.held.labels for d in devices]),
        np.ones(sum(len(d.held) for d in devices), np.int64),
    )
    central_model = model_from_checkpoint(ckpt)
    central, _ = _alone(central_model, table.as_float32(), union_train, union_held)
    central_acc = _accuracy(central_model, feats.test, yte, seen)
    alone = []
    for dev in devices[: args.alone_max]:
        m = model_from_checkpoint(ckpt)
        _, known = _alone(m, table.as_float32(), dev.train, dev.held)
        alone.append(_accuracy(m, feats.test, yte, known))
    up = [max(r["upload_bytes"].values()) for r in rounds if r["upload_bytes"]]
    return {
        "protocol": args.protocol,
        "image_size": size,
        "devices": args.devices,
        "classes_per_device": args.classes_per_device,
        "rounds": args.rounds,
        "merge": "analytic",
        "wire_dtype": args.wire_dtype,
        "analytic_dim": args.dim,
        "targets": args.targets,
        "seed": args.seed,
        "n_train": len(ytr),
        "n_test": len(yte),
        "fleet_heldout_accuracy_per_round": [r.get("fleet_accuracy") for r in rounds],
        "fleet_accuracy": round(fleet_acc, 6),
        "centralised_accuracy": round(central_acc, 6),
        "fleet_minus_centralised_points": round(100 * (fleet_acc - central_acc), 4),
        "fleet_lambda": rounds[-1].get("relative_lambda"),
        "centralised_lambda": central.choice.relative_lambda,
        "device_alone_mean": round(float(np.mean(alone)), 6),
        "device_alone_best": round(float(np.max(alone)), 6),
        "devices_alone_measured": len(alone),
        "devices_not_scored": sum(len(r.get("not_scored", {})) for r in rounds),
        "devices_left_out": sum(len(r.get("left_out", {})) for r in rounds),
        "upload_bytes_per_device_max": int(max(up)) if up else 0,
        "download_bytes_per_device": int(rounds[-1].get("download_bytes", 0)),
        "rounds_to_converge": 1,
        "round_wall_s": [r["wall_s"] for r in rounds],
        "round_step_s": [r.get("step_s", {}) for r in rounds],
        "simulation_wall_s": round(fleet_wall, 2),
        **provenance.provenance("python -m bench.fleet", args.argv),
    }


def fleet_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every fleet benchmark takes (bench/fleet.py, bench/fleet_gradient.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--protocol", default="imagenette-5-lite0", choices=sorted(PROTOCOLS))
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--classes-per-device", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/fleet"))
    return ap


def run_and_write(
    args: argparse.Namespace, argv: Sequence[str] | None, run_fn: Any, name: Any, shown: Sequence[str]
) -> int:
    """Run one fleet benchmark, write its result JSON (atomically) under ``--out`` as ``name(result)``
    and print the figures ``shown``."""
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_fn(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / name(result), json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = fleet_parser(__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--wire-dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--targets", default="whitened")
    ap.add_argument("--timeout-s", type=float, default=7200.0, help="per step: simulated devices run one after another")
    ap.add_argument("--alone-max", type=int, default=100, help="devices whose stand-alone model is measured")
    args = ap.parse_args(argv)
    shown = (
        "fleet_accuracy",
        "centralised_accuracy",
        "fleet_minus_centralised_points",
        "device_alone_mean",
        "device_alone_best",
        "upload_bytes_per_device_max",
        "simulation_wall_s",
    )
    return run_and_write(
        args,
        argv,
        run,
        lambda r: f"{args.protocol}-{r['image_size']}-analytic-d{args.devices}-{args.wire_dtype}-s{args.seed}.json",
        shown,
    )


if __name__ == "__main__":
    raise SystemExit(main())
