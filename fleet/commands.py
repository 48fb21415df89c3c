"""``cvm fleet``: create the coordinator's store, start its SuperLink, start a device's SuperNode,
run rounds, show the rounds so far. Imports of Flower and torch happen inside the commands."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cvm_edge.argtypes import int_at_least
from cvm_edge.errors import CvmError, UsageError
from fleet.average import MERGES

_positive = int_at_least(1)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("a share in (0, 1]")
    return value


def cmd_init(args: argparse.Namespace) -> int:
    from cvm_edge.analytic import DEFAULT_DIM
    from cvm_edge.pretrained import default_backbone
    from cvm_edge.update import InitOptions
    from fleet.coordinator import init_coordinator

    backbone, pretrained = (args.backbone, args.pretrained or "none") if args.backbone else default_backbone()
    pretrained = args.pretrained or pretrained
    gradient = args.learner == "gradient"
    # each learner's own options: one given for the other learner is a mistake, not a no-op
    wrong = ["--analytic-dim", "--targets"] if gradient else ["--mapper-hidden"]
    given = [o for o in wrong if getattr(args, o[2:].replace("-", "_")) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only for --learner {'analytic' if gradient else 'gradient'}")
    opts = InitOptions(
        concepts=args.concepts,
        backbone=backbone,
        image_size=args.image_size,
        train_backbone="none",
        pretrained=pretrained,
        seed=args.seed,
        learner=args.learner,
        analytic_dim=args.analytic_dim or DEFAULT_DIM,
        analytic_targets=args.targets or "whitened",
        mapper_hidden=512 if args.mapper_hidden is None else args.mapper_hidden,
    )
    version = init_coordinator(args.workdir, opts)
    shape = f"mapper hidden {opts.mapper_hidden}, --merge fedavg | fusion" if gradient else f"M = {opts.analytic_dim}"
    print(
        f"fleet coordinator store {args.workdir}: version {version} ({args.learner}, {backbone}, {pretrained} "
        f"weights, {args.image_size} px, {shape})"
    )
    return 0


def _exec(argv: list[str], env: dict[str, str], replace: bool = False) -> int:
    """Run a Flower process in the foreground until it ends (Ctrl-C stops it). ``replace``: become
    that process, so a service manager's signals reach Flower itself."""
    from fleet.runtime import shown

    print(f"$ {shown(argv)}", file=sys.stderr, flush=True)
    try:
        if replace:
            os.execve(argv[0], argv, env)
        return subprocess.call(argv, env=env)
    except FileNotFoundError:
        raise UsageError(f"{argv[0]} is not installed: pip install 'cvm-edge[fleet]'") from None


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fleet.coordinator import Coordinator
    from fleet.runtime import process_env, superlink_argv

    Coordinator(args.workdir).latest()  # refuse a workdir that is no coordinator store before starting
    return _exec(superlink_argv(args.workdir, args.host, args.port), process_env(args.workdir), replace=True)


def cmd_device(args: argparse.Namespace) -> int:
    from fleet.runtime import process_env, supernode_argv

    if args.data is not None and not args.data.is_dir():
        raise UsageError(f"--data {args.data} is not a folder")
    args.workdir.mkdir(parents=True, exist_ok=True)
    name = args.name or args.workdir.resolve().name
    argv = supernode_argv(args.coordinator, args.workdir, args.data, name, args.port, args.max_forgetting)
    return _exec(argv, process_env(args.workdir), replace=True)


def cmd_run(args: argparse.Namespace) -> int:
    from fleet.average import merge_mismatch
    from fleet.coordinator import Coordinator
    from fleet.runtime import run_argv, run_env
    from fleet.settings import FleetSettings

    mismatch = merge_mismatch(args.merge, Coordinator(args.workdir).learner())
    if mismatch:
        raise UsageError(mismatch)
    analytic = args.merge == "analytic"
    # each merge's own options: one given for the other kind is a mistake, not a no-op
    if not analytic and args.wire_dtype is not None:
        raise UsageError(
            f"--wire-dtype sets the analytic statistics' precision; --merge {args.merge} sends float32 weights"
        )
    if analytic and args.local_epochs is not None:
        raise UsageError("--local-epochs applies to --merge fedavg | fusion; analytic devices learn each image once")
    try:
        settings = FleetSettings(
            workdir=args.workdir,
            rounds=args.rounds,
            min_devices=args.min_devices,
            quorum=args.quorum,
            wire_dtype=args.wire_dtype or "float32",
            wait_s=args.wait_s,
            timeout_s=args.timeout_s,
            merge=args.merge,
            local_epochs=args.local_epochs or 1,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from cvm_edge.fsutil import FileLock
    from fleet.report import load_rounds
    from fleet.state import fleet_dir

    # One run at a time on a coordinator store: two would interleave their rounds, and each counts the
    # rounds it ran from rounds.json. The kernel drops the lock if this process dies.
    with FileLock(fleet_dir(args.workdir) / "run.lock", "cvm fleet run"):
        before = len(load_rounds(args.workdir))
        code = _exec(run_argv(settings), run_env(args.workdir, args.coordinator))
        if code != 0:
            raise CvmError(f"flwr run ended with exit code {code}; see its output above")
    cmd_status(args)
    ran = load_rounds(args.workdir)[before:]
    failed = [r["round"] for r in ran if not r.get("published")]
    if len(ran) < settings.rounds:  # the ServerApp ended early (it crashed): flwr run still exits 0
        raise CvmError(
            f"{len(ran)} of {settings.rounds} round(s) ran; see the output above. Published rounds stay published"
        )
    if not ran or failed:
        raise CvmError(
            f"round(s) {', '.join(map(str, failed)) or '(none ran)'} published nothing; the devices keep serving "
            "their previous version"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.report import RoundReport, load_rounds, matrix_text

    rounds = load_rounds(args.workdir)
    if not rounds:
        print("no fleet rounds yet")
        return 0
    print(matrix_text([RoundReport(**r) for r in rounds]))
    return 0


def add_fleet_commands(sub: Any) -> None:
    f = sub.add_parser("fleet", help="learn across many devices on Flower: statistics travel, images never do")
    fsub = f.add_subparsers(dest="fleet_command", required=True)

    i = fsub.add_parser("init", help="create the coordinator's store: the fleet's base, table and model")
    i.add_argument("--workdir", type=Path, required=True)
    i.add_argument("--concepts", type=Path, required=True, help="the fleet's concept table (.npz); devices add names")
    i.add_argument("--backbone", default=None, help="timm name (default: the offline pretrained Lite0)")
    i.add_argument("--pretrained", default=None, help="none | offline | hub | PATH (every device loads the same)")
    i.add_argument("--image-size", type=_positive, default=224)
    i.add_argument(
        "--learner",
        choices=("analytic", "gradient"),
        default="analytic",
        help="analytic: devices send ridge statistics (--merge analytic, exact); gradient: devices train the "
        "concept head with `cvm update` and send its weights (--merge fedavg | fusion)",
    )
    i.add_argument("--analytic-dim", type=_positive, default=None, help="analytic: M, the projection's width (2048)")
    i.add_argument("--targets", choices=("whitened", "concepts", "onehot"), default=None, help="analytic (whitened)")
    i.add_argument("--mapper-hidden", type=int_at_least(0), default=None, help="gradient: the mapper's width (512)")
    i.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the projection's (analytic) or the head's first weights' (gradient) seed, shared by every device",
    )
    i.set_defaults(func=cmd_init)

    c = fsub.add_parser("coordinator", help="run the coordinator's Flower SuperLink (foreground)")
    c.add_argument("--workdir", type=Path, required=True)
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    c.add_argument("--port", type=_positive, default=8000)
    c.set_defaults(func=cmd_coordinator)

    d = fsub.add_parser("device", help="run this device's Flower SuperNode on its store (foreground)")
    d.add_argument("--workdir", type=Path, required=True, help="the device's store (created on the fleet's base)")
    d.add_argument("--coordinator", type=_address, required=True, help="HOST:PORT of the coordinator's SuperLink")
    d.add_argument("--data", type=Path, default=None, help="class folders to learn locally; new images are learnt once")
    d.add_argument("--name", default=None, help="the device's name in reports (default: the workdir's name)")
    d.add_argument("--port", type=_positive, default=9094, help="the SuperNode's own local API port")
    d.add_argument(
        "--max-forgetting", type=float, default=10.0, help="the forgetting gate of the device's local updates (points)"
    )
    d.set_defaults(func=cmd_device)

    r = fsub.add_parser("run", help="run fleet rounds: merge (analytic, fedavg or fusion), publish on every device")
    r.add_argument("--workdir", type=Path, required=True, help="the coordinator's store")
    r.add_argument("--coordinator", type=_address, default="127.0.0.1:8000", help="HOST:PORT of the SuperLink")
    r.add_argument("--rounds", type=_positive, default=1)
    r.add_argument("--min-devices", type=_positive, default=1, help="a round waits for this many devices")
    r.add_argument("--quorum", type=_share, default=1.0, help="share of devices that must contribute (default all)")
    r.add_argument(
        "--merge",
        choices=MERGES,
        default="analytic",
        help="analytic: add the devices' statistics (an analytic coordinator store); fedavg: average the devices' "
        "head weights by their image counts; fusion: ConDU fusion of their deltas (a gradient store)",
    )
    r.add_argument(
        "--local-epochs", type=_positive, default=None, help="fedavg | fusion: epochs of each local update (1)"
    )
    r.add_argument(
        "--wire-dtype", choices=("float32", "float64"), default=None, help="analytic uploads' precision (float32)"
    )
    r.add_argument("--wait-s", type=float, default=120.0, help="how long a round waits for --min-devices")
    r.add_argument("--timeout-s", type=float, default=600.0, help="how long each step waits for the devices")
    r.set_defaults(func=cmd_run)

    s = fsub.add_parser("status", help="the rounds so far: accuracy per device, bytes, devices left out")
    s.add_argument("--workdir", type=Path, required=True)
    s.set_defaults(func=cmd_status)
