"""How many runs of a priority list fit a GPU lease, from a measured step rate (bench.step_speed).

A run that is cut by the end of the lease leaves no result, so the grid starts only as many runs
per GPU as the measured aggregate rate finishes in the time left. The rate is measured on DER++ steps
(32 new + 64 replayed images); lighter methods count by the images they pass forward and backward per
step (:data:`STEP_COST`), so more of them share a GPU:

    python -m bench.gpu_plan --speed step_speed.json --mode graph-bf16 --seconds 1150 --gpus 2 \
        --steps-per-run 78250 --jobs derpp:500:0,cvm-derpp:500:0,...

prints one line per GPU: ``GPU_INDEX JOBS`` (jobs alternate between GPUs in priority order).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# Images through forward and backward per step, relative to DER++'s 96 (a teacher's forward-only pass
# counts a third of an image).
STEP_COST = {
    "finetune": 32 / 96,
    "joint": 32 / 96,
    "ewc": 32 / 96,
    "lwf": (32 + 32 / 3) / 96,
    "er": 64 / 96,
    "cvm-er": 64 / 96,
    "cvm-er-distill": (64 + 64 / 3) / 96,
    "cvm-er-distill-ce": (64 + 64 / 3) / 96,
    "cvm-er-distill-sgd": (64 + 64 / 3) / 96,
    "cvm-er-distill-align": (64 + 64 / 3) / 96,
}


def job_cost(job: str) -> float:
    """A job's share of a DER++ run (``METHOD:BUFFER:SEED``; unknown methods count as DER++)."""
    return STEP_COST.get(job.split(":")[0], 1.0)


def pack(jobs: Sequence[str], gpus: int, capacity: float) -> list[list[str]]:
    """Jobs in priority order onto the GPUs, each up to ``capacity`` DER++-run equivalents: every job
    goes to the least-loaded GPU that still has room; one that fits nowhere is left out (so are later
    ones only if they do not fit either)."""
    out: list[list[str]] = [[] for _ in range(gpus)]
    load = [0.0] * gpus
    for job in jobs:
        g = min(range(gpus), key=lambda i: load[i])
        if load[g] + job_cost(job) <= capacity + 1e-9:
            out[g].append(job)
            load[g] += job_cost(job)
    return out


def runs_per_gpu(rate_steps_per_s: float, seconds: float, steps_per_run: int, lo: int, hi: int) -> int:
    """Runs that share one GPU and all finish: aggregate rate x time / steps per run, within [lo, hi]."""
    return max(lo, min(hi, int(rate_steps_per_s * seconds / steps_per_run)))


def measured_rate(speed: dict, mode: str) -> float:
    """Aggregate steps/s of ``mode`` at the largest process count measured."""
    rows = [r for r in speed.get("rows", []) if r["mode"] == mode and "error" not in r]
    if not rows:
        raise SystemExit(f"no {mode} measurement in the step-speed record")
    return float(max(rows, key=lambda r: r["processes"])["steps_per_s_total"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_plan", description=__doc__.splitlines()[0])
    ap.add_argument("--speed", type=Path, required=True)
    ap.add_argument("--mode", default="graph-bf16")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--steps-per-run", type=int, required=True)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=8)
    ap.add_argument("--jobs", required=True)
    args = ap.parse_args(argv)
    rate = measured_rate(json.loads(args.speed.read_text()), args.mode)
    n = runs_per_gpu(rate, args.seconds, args.steps_per_run, args.min, args.max)
    print(f"# {args.mode}: {rate:.0f} steps/s per GPU -> {n} DER++-run equivalents per GPU", file=sys.stderr)
    for gpu, jobs in enumerate(pack([j for j in args.jobs.split(",") if j], args.gpus, n)):
        if jobs:
            print(gpu, ",".join(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
