"""Gradient merges for a fleet (issue 21), in Flower's simulation runtime: FedAvg and ConDU fusion of the devices' deltas (the product's own merges, ``fleet.average``, inside Flower's
strategy), on the gradient learner's concept head (the
mapper MLP and logit scale of ``cvm_edge.model.ConceptHead``) trained on frozen Lite0 features
with a device's own classification loss (``fleet.weights_device.DEVICE_LOSS``: its images compete
only among its classes); beside centralised training of the same head on the union for the same
number of passes with the same loss (there: cross-entropy over all the classes). The
same non-IID partition and features as bench/fleet.py. Reference figures: which merge reaches
centralised, after how many rounds, and where it breaks.

    python -m bench.fleet_gradient --protocol imagenette-5-lite0 --image-size 224 --devices 10 --merge fedavg
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench import provenance
from bench.fleet import fleet_parser, load_features, partition, run_and_write
from bench.protocols import PROTOCOLS
from bench.tables import concept_vectors
from cvm_edge.lab.routing import FusedRoutedModel
from cvm_edge.model import ConceptHead, ModelConfig, build_head_model
from cvm_edge.strategy import LOSSES, Batch, classification_loss
from fleet.average import SERVER_MOMENTUM, Weights, WeightsMerge, WeightsUpload, fedavgm, fuse, fuse_devices
from fleet.fused import fusion_state
from fleet.weights_device import DEVICE_LOSS

log = logging.getLogger(__name__)
HIDDEN = 512  # the product's default mapper width (cvm init --mapper-hidden)
HEAD = "head."  # the bench trains the ConceptHead alone; the product's model names it "head"


def new_head(table: np.ndarray, feat_dim: int, seed: int) -> ConceptHead:
    torch.manual_seed(seed)
    return ConceptHead(feat_dim, table, HIDDEN, math.log(16.0))


@dataclasses.dataclass(frozen=True)
class DeviceRows:
    """The table rows a device's local update trains among (``cvm_edge.strategy.LossRows``), as a
    real device's ``Context`` gives them: ``seen`` the classes of the fleet's weights it adopted and
    its own, ``current_classes`` its own (its update's folder), ``seen_revisited`` which seen rows
    it brings images of and the fleet knew before, ``local_classes`` its own (its replay buffer
    holds only its own images)."""

    seen: torch.Tensor
    current_classes: torch.Tensor
    seen_revisited: torch.Tensor
    local_classes: torch.Tensor

    @classmethod
    def of(cls, own: Iterable[int], fleet_seen: Iterable[int]) -> DeviceRows:
        mine, known = {int(c) for c in own}, {int(c) for c in fleet_seen}
        seen = torch.as_tensor(sorted(mine | known), dtype=torch.long)
        local = torch.as_tensor(sorted(mine), dtype=torch.long)
        return cls(seen, local, torch.isin(seen, torch.as_tensor(sorted(mine & known), dtype=torch.long)), local)


def local_train(
    head: ConceptHead,
    x: np.ndarray,
    y: np.ndarray,
    rows: DeviceRows,
    loss: str,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
) -> None:
    """A device's local update of the head on its features: Adam, and the product's own
    classification loss (``cvm_edge.strategy.classification_loss``) of kind ``loss`` over ``rows``;
    the device's loss by default (``fleet.weights_device.DEVICE_LOSS``)."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    head.train()
    for _ in range(epochs):
        for i in np.array_split(rng.permutation(len(y)), max(1, math.ceil(len(y) / batch))):
            opt.zero_grad()
            b = Batch(xt[i], yt[i], torch.zeros(len(i), dtype=torch.bool))  # incoming images, none replayed
            classification_loss(head(b.inputs), b, rows, loss).backward()
            opt.step()
    head.eval()


@torch.no_grad()
def accuracy(head: ConceptHead, x: np.ndarray, y: np.ndarray) -> float:
    head.eval()
    return float((head(torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy() == y).mean())


class ProductMerge(FedAvg):
    """Flower's FedAvg strategy (sampling, rounds, evaluation) with the product's merge in place of its
    aggregation: ``fleet.average.fedavgm`` (image-weighted mean and server momentum ``momentum``, as
    ``cvm fleet run --merge fedavg``; 0: the plain mean) or
    ``fleet.average.fuse`` (ConDU's unified delta of the devices' deltas from this round's global
    model, as ``--merge fusion``), so the figures are those of the code the product runs."""

    def __init__(
        self, how: str, initial: dict[str, torch.Tensor], momentum: float = SERVER_MOMENTUM, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.how = how
        self.beta = momentum
        self.moved: Weights | None = None  # fedavg: the last round's move (the product's coordinator keeps it)
        self.current = {k: v.detach().float().numpy().copy() for k, v in initial.items()}
        self.last_round: tuple[Weights, list[Weights], list[int]] | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        states, images, devices = [], [], []
        for r in replies:
            if r.has_error():
                continue
            states.append({k: np.asarray(v.numpy(), np.float32) for k, v in r.content.array_records["arrays"].items()})
            metrics = r.content.metric_records["metrics"]
            images.append(int(str(metrics["num-examples"])))
            devices.append(int(str(metrics.get("device", -1))))
        if not states:
            return None, None
        self.last_round = (dict(self.current), states, devices)  # what the routed evaluation rebuilds from
        if self.how == "fedavg":
            self.current, self.moved = fedavgm(self.current, states, images, self.moved, self.beta)
        else:
            self.current = fuse(self.current, states)
        return ArrayRecord({k: torch.from_numpy(v) for k, v in self.current.items()}), MetricRecord(
            {"devices": len(states)}
        )


ROUTED_K = (1, 2)
ROUTED_EVERY_ROUND_UP_TO = 20  # devices


@torch.no_grad()
def routed_accuracy(
    table: np.ndarray,
    last_round: tuple[Weights, list[Weights], list[int]],
    parts: Sequence[np.ndarray],
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
) -> dict[int, float]:
    """Top-k routed accuracy over the devices' models rebuilt from the round's fusion (each device's
    mask and rescale, ``fleet.fused.fusion_state``), routed by each device's prototype (the mean
    feature of its images), through the product's ``cvm_edge.lab.routing.FusedRoutedModel``."""
    start, states, devices = last_round
    prefixed = lambda w: {HEAD + k: v for k, v in w.items()}  # noqa: E731 - the CvmModel's names
    _, unified = fuse_devices(prefixed(start), [prefixed(w) for w in states])
    uploads = tuple(
        WeightsUpload(
            str(d),
            "",
            "",
            prefixed(w),
            len(parts[d]),
            (),
            0,
            np.asarray(xtr[parts[d]].mean(0), np.float32),
            tuple(sorted({int(c) for c in ytr[parts[d]]})),
        )
        for d, w in zip(devices, states, strict=True)
    )
    merge = WeightsMerge({}, (), {}, {}, (), start=prefixed(start), unified=unified, uploads=uploads)
    config = ModelConfig(
        backbone="tf_efficientnet_lite0",
        image_size=224,
        train_backbone="none",
        mapper_hidden=HIDDEN,
        learner="gradient",
    )
    template = build_head_model(config, table, xtr.shape[1])
    names = {n for n, q in template.named_parameters() if q.requires_grad}
    state = fusion_state(merge, names)
    assert state is not None
    routed = FusedRoutedModel(template, state, k=1)
    x = torch.from_numpy(np.asarray(xte, np.float32))
    return {k: float((routed.with_k(k)(x).argmax(1).numpy() == yte).mean()) for k in ROUTED_K}


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.image_size or PROTOCOLS[args.protocol].image_size
    feats, ytr, yte, names = load_features(args.protocol, size, args.seed)
    table, fingerprint = concept_vectors(names)
    parts = partition(ytr, args.devices, args.classes_per_device, args.seed)
    xtr, xte = feats.train, feats.test
    init = new_head(table, xtr.shape[1], args.seed).state_dict()
    # The fleet's classes after round 1 (every device trains every round; every class is on a device):
    # from round 2 on all of them are seen on each device, as the merged model's seen rows.
    fleet_classes = sorted({int(c) for c in ytr[np.concatenate(list(parts))]})
    curve: list[float] = []
    routed: dict[int, list[float]] = {k: [] for k in ROUTED_K}
    routed_rounds: list[int] = []
    strategies: list[ProductMerge] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        head = new_head(table, xtr.shape[1], args.seed)
        head.load_state_dict(arrays.to_torch_state_dict())
        curve.append(accuracy(head, xte, yte))
        log.info("%s round %d: %.2f %%", args.merge, server_round, 100 * curve[-1])
        last = strategies[0].last_round if strategies else None
        # Every round for small fleets; for large ones the last round only (each routed pass runs every
        # device's model on every test image: ~100 s a round for 100 devices on GTSRB on 2 cores).
        each = args.devices <= ROUTED_EVERY_ROUND_UP_TO
        if args.merge == "fusion" and server_round > 0 and last is not None and (each or server_round == args.rounds):
            for k, a in routed_accuracy(table, last, parts, xtr, ytr, xte, yte).items():
                routed[k].append(a)
            routed_rounds.append(server_round)
            log.info("fusion round %d routed top-1 %.2f %%", server_round, 100 * routed[1][-1])
        return MetricRecord({"accuracy": curve[-1]})

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        d = int(context.node_config["partition-id"])
        head = new_head(table, xtr.shape[1], args.seed)
        head.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        rnd = int(str(msg.content.config_records["config"]["server-round"]))
        y = ytr[parts[d]]
        rows = DeviceRows.of(y, fleet_classes if rnd > 1 else ())
        local_train(
            head, xtr[parts[d]], y, rows, args.loss, args.local_epochs, args.lr, args.batch, args.seed + 1000 * rnd + d
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(head.state_dict()),
                "metrics": MetricRecord({"num-examples": len(parts[d]), "device": d}),
            }
        )
        return Message(content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        n = args.devices
        kw: dict[str, Any] = {
            "fraction_train": 1.0,
            "fraction_evaluate": 0.0,
            "min_train_nodes": n,
            "min_available_nodes": n,
        }
        strategy = ProductMerge(args.merge, init, args.server_momentum, **kw)
        strategies.append(strategy)
        strategy.start(grid, ArrayRecord(init), num_rounds=args.rounds, evaluate_fn=evaluate)

    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_simulation(
        server,
        client,
        num_supernodes=args.devices,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.cpus}},
    )
    wall = time.perf_counter() - t0
    torch.set_num_threads(args.cpus)
    central = new_head(table, xtr.shape[1], args.seed)
    central_curve = []
    # The same passes over the union, one epoch block per round, as one device holding every class
    # with the same loss: each kind is then plain cross-entropy over all the protocol's classes.
    for rnd in range(1, args.rounds + 1):
        rows = DeviceRows.of(fleet_classes, fleet_classes if rnd > 1 else ())
        local_train(central, xtr, ytr, rows, args.loss, args.local_epochs, args.lr, args.batch, args.seed + 1000 * rnd)
        central_curve.append(accuracy(central, xte, yte))
    fleet = curve[1:]  # curve[0] is the initial model (round 0)
    params = sum(int(v.numel()) for v in init.values())
    within = [i + 1 for i, a in enumerate(fleet) if central_curve[-1] - a <= 0.05]
    return {
        "protocol": args.protocol,
        "image_size": size,
        "devices": args.devices,
        "classes_per_device": args.classes_per_device,
        "rounds": args.rounds,
        "merge": args.merge,
        "local_epochs": args.local_epochs,
        "loss": args.loss,
        "lr": args.lr,
        "batch": args.batch,
        **({"server_momentum": args.server_momentum} if args.merge == "fedavg" else {}),
        "seed": args.seed,
        "concept_table": fingerprint,
        "fleet_accuracy_per_round": [round(a, 6) for a in fleet],
        "centralised_accuracy_per_round": [round(a, 6) for a in central_curve],
        "fleet_accuracy": round(fleet[-1], 6),
        "centralised_accuracy": round(central_curve[-1], 6),
        "fleet_minus_centralised_points": round(100 * (fleet[-1] - central_curve[-1]), 4),
        "first_round_within_5_points": within[0] if within else None,
        # fusion: the head and the routing prototype (the mean feature of the device's images)
        "upload_bytes_per_device_per_round": params * 4 + (4 * xtr.shape[1] if args.merge == "fusion" else 0),
        "download_bytes_per_device_per_round": params * 4,
        "simulation_wall_s": round(wall, 2),
        **(
            {
                "routed_rounds": routed_rounds,
                **{f"routed_top{k}_accuracy_per_round": [round(a, 6) for a in routed[k]] for k in ROUTED_K},
            }
            if args.merge == "fusion"
            else {}
        ),
        **provenance.provenance("python -m bench.fleet_gradient", args.argv),
    }


def _variant_tag(loss: str, local_epochs: int, momentum: float = SERVER_MOMENTUM) -> str:
    return (
        ("" if loss == DEVICE_LOSS else f"-{loss}")
        + ("" if local_epochs == 1 else f"-e{local_epochs}")
        + ("" if momentum == SERVER_MOMENTUM else f"-m{momentum:g}")
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = fleet_parser(__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--merge", choices=("fedavg", "fusion"), default="fedavg")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument(
        "--loss",
        choices=LOSSES,
        default=DEVICE_LOSS,
        help="the device's classification loss (cvm_edge.strategy.classification_loss); default: a fleet "
        "device's own; ce-all: every table row, as this benchmark trained before",
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam, the product's default")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--server-momentum",
        type=float,
        default=SERVER_MOMENTUM,
        help="fedavg's server momentum (FedAvgM, fleet.average.fedavgm), the product's default; 0: plain FedAvg",
    )
    args = ap.parse_args(argv)
    shown = ("fleet_accuracy_per_round", "centralised_accuracy", "fleet_minus_centralised_points", "simulation_wall_s")
    return run_and_write(
        args,
        argv,
        run,
        # the device's loss and 1 local epoch keep the plain name; others are named, so all stay side by side
        lambda r: (
            f"{args.protocol}-{r['image_size']}-{args.merge}"
            f"{_variant_tag(args.loss, args.local_epochs, args.server_momentum if args.merge == 'fedavg' else SERVER_MOMENTUM)}"
            f"-d{args.devices}-s{args.seed}.json"
        ),
        shown,
    )


if __name__ == "__main__":
    raise SystemExit(main())
