"""Run a grid of benchmark runs as parallel processes (several per GPU) and record its wall time.

    python -m bench.grid --protocol cifar10-5 --methods all --buffers 200,500 --seeds 0,1,2 \
        --parallel 12 --device cuda -- --epochs 5

Methods without a buffer run once per seed. The longest runs start first. The grid's wall time
(the GPU minutes it held the card) goes to ``<out>/<protocol>/_grid-<tag>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.methods import METHODS
from bench.provenance import git_commit
from bench.run import RESULTS, machine
from cvm_edge.fsutil import atomic_write_text

# Relative cost per step (forward passes per step, roughly), to start the longest runs first.
COST = {"joint": 5.0, "derpp": 1.6, "cvm-derpp": 1.7, "cvm-er-distill": 1.5, "ewc": 1.1, "lwf": 1.3}


def jobs(methods: Sequence[str], buffers: Sequence[int], seeds: Sequence[int]) -> list[tuple[str, int, int]]:
    out = []
    for s in seeds:
        for m in methods:
            for b in buffers if METHODS[m].uses_buffer else buffers[:1]:
                out.append((m, b if METHODS[m].uses_buffer else 0, s))
    # Seed-major, so a grid cut short still has complete seeds; the longest runs of a seed first.
    return sorted(out, key=lambda j: (j[2], -COST.get(j[0], 1.0)))


def parse_job(text: str) -> tuple[str, int, int]:
    """``derpp:500:0`` -> ("derpp", 500, 0); the buffer of a method without one is recorded as 0."""
    try:
        m, b, s = text.split(":")
        job = (m, int(b), int(s))
    except ValueError:
        raise SystemExit(f"bad job {text!r}: expected METHOD:BUFFER:SEED") from None
    if m not in METHODS:
        raise SystemExit(f"unknown method {m!r} in job {text!r}")
    return (m, job[1] if METHODS[m].uses_buffer else 0, job[2])


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up below must not be interrupted
    raise KeyboardInterrupt


def _loop(
    args: argparse.Namespace,
    todo: list[tuple[str, int, int]],
    running: list[tuple[subprocess.Popen[bytes], tuple[str, int, int]]],
    done: list[dict[str, object]],
    logs: Path,
    t0: float,
) -> None:
    while todo or running:
        while todo and len(running) < args.parallel:
            if args.deadline is not None and time.perf_counter() - t0 > args.deadline:
                todo.clear()
                break
            m, b, s = todo.pop(0)
            cmd = [sys.executable, "-m", "bench.run", "--protocol", args.protocol, "--method", m, "--buffer", str(b)]
            cmd += ["--seed", str(s), "--device", args.device, "--out", str(args.out), *args.extra]
            log = open(logs / f"{m}-b{b}-s{s}.log", "wb")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), (m, b, s)))
        time.sleep(1.0)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                done.append({"method": job[0], "buffer": job[1], "seed": job[2], "rc": proc.returncode})
                print(f"[{time.perf_counter() - t0:7.1f}s] {job} rc={proc.returncode}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--methods", default="all")
    ap.add_argument("--buffers", default="200,500")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--logs", type=Path, default=None)
    ap.add_argument("--tag", default="grid")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: start no run after this")
    ap.add_argument(
        "--jobs", default=None, help="explicit runs METHOD:BUFFER:SEED,... in this order (instead of the product)"
    )
    ap.add_argument("--skip-existing", type=Path, default=None, help="results root: skip runs whose JSON is there")
    ap.add_argument("extra", nargs="*", help="arguments passed to every bench.run (after --)")
    args = ap.parse_args(argv)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if args.jobs:
        todo = [parse_job(j) for j in args.jobs.split(",") if j]
    else:
        todo = jobs(methods, [int(b) for b in args.buffers.split(",")], [int(s) for s in args.seeds.split(",")])
    if args.skip_existing is not None:
        have = args.skip_existing / args.protocol
        todo = [j for j in todo if not (have / f"{j[0]}-b{j[1]}-s{j[2]}.json").is_file()]
    logs = args.logs or args.out / args.protocol / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    from bench.protocols import PROTOCOLS, build_scenario

    build_scenario(PROTOCOLS[args.protocol], 0)  # decode the data into the cache once, before the runs
    signal.signal(signal.SIGTERM, _stop)
    t0 = time.perf_counter()
    running: list[tuple[subprocess.Popen[bytes], tuple[str, int, int]]] = []
    done: list[dict[str, object]] = []
    try:
        _loop(args, todo, running, done, logs, t0)
    except KeyboardInterrupt:
        for proc, job in running:
            proc.terminate()
            done.append({"method": job[0], "buffer": job[1], "seed": job[2], "rc": "stopped"})
        done += [{"method": m, "buffer": b, "seed": sd, "rc": "not started"} for m, b, sd in todo]
    wall = time.perf_counter() - t0
    record = {
        "protocol": args.protocol,
        "tag": args.tag,
        "parallel": args.parallel,
        "device": args.device,
        "machine": machine(args.device),
        "extra_args": args.extra,
        "runs": done,
        "wall_s": round(wall, 1),
        "gpu_minutes": round(wall / 60.0, 2) if args.device.startswith("cuda") else 0.0,
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = args.out / args.protocol / f"_grid-{args.tag}.json"
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"grid {args.protocol}: {len(done)} runs in {wall / 60:.1f} min -> {path}")
    return 0 if all(d["rc"] == 0 for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
