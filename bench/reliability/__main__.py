"""``python -m bench.reliability {kill,disk-full,load,fuzz,hostile} [--workdir W] [--out FILE]``: the
reliability runs outside pytest, on a given store or on a fresh small one. Prints the figures as
JSON; ``--out`` also merges them into a results file (e.g. bench/results/reliability.json)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.reliability.common import (
    SMALL_INIT,
    build_table,
    real_jpegs,
    record,
    run_cvm,
    running_server,
    write_update_data,
)


def _store(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """(workdir, update data): the given store, or a fresh small one (init only: the first update
    is the kill campaign's timed calibration run, or made here for the other runs)."""
    data = args.data or write_update_data(tmp / "data", [0, 1], 20)
    if args.workdir is not None:
        return args.workdir, data
    wd = tmp / "w"
    proc = run_cvm("-q", "init", "--workdir", str(wd), "--concepts", str(build_table(tmp / "table.npz")), *SMALL_INIT)
    if proc.returncode != 0:
        sys.exit(f"cvm init failed: {proc.stderr}")
    return wd, data


def _first_update(wd: Path, data: Path) -> None:
    from bench.reliability.common import FAST_UPDATE

    if not (wd / "bundles" / "CURRENT").is_file():
        proc = run_cvm("-q", "update", "--workdir", str(wd), "--data", str(data), *FAST_UPDATE)
        if proc.returncode != 0:
            sys.exit(f"cvm update failed: {proc.stderr[-2000:]}")


def cmd_kill(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.reliability.kill import default_plan, measure_timeline, run_campaign
    from cvm_edge.cli import main as cvm

    wd, data = _store(args, tmp)
    timeline = measure_timeline(wd, data)
    with running_server(["--workdir", str(wd), "--threads", "1", "--poll-interval", "0.2"], tmp / "server.log") as s:
        plan = default_plan(args.seed, args.random)
        figures = run_campaign(
            wd,
            data,
            s,
            real_jpegs(16),
            plan,
            lambda w: cvm(["-q", "status", "--workdir", str(w)]),
            timeline,
            lambda m: print(m, file=sys.stderr),
        )
    return {"seed": args.seed, **figures}


def cmd_disk_full(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.reliability.diskfull import namespaces_available, run_disk_full, run_injected

    wd, data = _store(args, tmp)
    _first_update(wd, data)
    if namespaces_available():
        return run_disk_full(wd, data)
    import shutil

    shutil.copytree(wd, tmp / "injected")
    return run_injected(tmp / "injected", data)


def cmd_load(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.reliability.load import republish, run_load
    from deploy.bundle import load_bundle

    wd, data = _store(args, tmp)
    _first_update(wd, data)
    version = load_bundle(wd / "bundles" / (wd / "bundles" / "CURRENT").read_text().strip()).version
    sources = {"fp32": f"v{version:06d}"}
    for precision in ("fp16", "int8"):
        proc = run_cvm("-q", "export", "--workdir", str(wd), "--precision", precision, "--version", str(version))
        if proc.returncode != 0:
            sys.exit(f"cvm export failed: {proc.stderr[-2000:]}")
        sources[precision] = (wd / "bundles" / "CURRENT").read_text().strip()
    with running_server(["--workdir", str(wd), "--poll-interval", "0.5"], tmp / "server.log") as s:
        return run_load(
            s, real_jpegs(64), lambda p: republish(wd, sources[p]), args.seconds, args.clients, args.publishes
        )


def cmd_fuzz(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.reliability.fuzz import payloads, run_fuzz
    from deploy.bundle import current_bundle_dir, load_bundle

    wd, data = _store(args, tmp)
    _first_update(wd, data)
    size = load_bundle(current_bundle_dir(wd)).prep.image_size  # type: ignore[arg-type]
    with running_server(["--workdir", str(wd), "--threads", "1"], tmp / "server.log") as s:
        report = run_fuzz(s.url, payloads(real_jpegs(4), size, args.seed), lambda: s.alive())
        return {"seed": args.seed, **report.figures(), "server_alive": s.alive()}


def cmd_hostile(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bench.reliability.hostile import corpus, hard_images, run_bombs, run_corpus, run_health_under_decode
    from deploy.bundle import current_bundle_dir, load_bundle

    wd, data = _store(args, tmp)
    _first_update(wd, data)
    size = load_bundle(current_bundle_dir(wd)).prep.image_size  # type: ignore[arg-type]
    with running_server(["--workdir", str(wd)], tmp / "server.log") as s:
        return {
            "corpus": run_corpus(s.url, s.rss_bytes, corpus(size)),
            "bombs": run_bombs(s.url, s.rss_bytes, concurrency=64),
            "health_under_decode": run_health_under_decode(s.url, hard_images(), clients=40, duration_s=args.seconds),
            "server_alive": s.alive(),
        }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__)
    ap.add_argument("run", choices=("kill", "disk-full", "load", "fuzz", "hostile"))
    ap.add_argument("--workdir", type=Path, default=None, help="a store (default: a fresh small one in a temp dir)")
    ap.add_argument("--data", type=Path, default=None, help="update folder (default: 2 Fashion-MNIST classes)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--random", type=int, default=3, help="kill: random-time kills besides the fault points")
    ap.add_argument("--seconds", type=float, default=60.0, help="load, hostile (health under decode): duration")
    ap.add_argument("--clients", type=int, default=16, help="load: concurrent clients")
    ap.add_argument("--publishes", type=int, default=5, help="load: bundles published during the run")
    ap.add_argument("--out", type=Path, default=None, help="merge the figures into this JSON file")
    args = ap.parse_args()
    run = {"kill": cmd_kill, "disk-full": cmd_disk_full, "load": cmd_load, "fuzz": cmd_fuzz, "hostile": cmd_hostile}[
        args.run
    ]
    with tempfile.TemporaryDirectory(prefix="cvm-reliability-") as tmp:
        figures = run(args, Path(tmp))
    print(json.dumps(figures, indent=2))
    if args.out is not None:
        record(args.run.replace("-", "_"), figures, args.out)


if __name__ == "__main__":
    main()
