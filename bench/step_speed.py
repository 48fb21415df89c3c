"""Training-step throughput of the product's Strategy on a GPU: eager against CUDA-graph replay.

One measurement = one epoch of a protocol's second task (the buffer already holds the first task's
images and their logits), timed over the whole ``train_experience`` call (the warm-up steps, the
capture and the end-of-task logits and buffer update included, so the rates are slightly low), in
one process; ``--procs N`` starts N such processes at once on the same card (under CUDA MPS when
the caller started it) and adds their rates. Before timing, eager and graphed training of the same
epoch from the same state and seed are run and their final losses and largest relative weight gap
recorded (``eager_vs_graph``): a faster mode that computes something else shows there.

    python -m bench.step_speed --device cuda --method derpp --modes eager,graph,graph-bf16 --procs 1,8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import provenance
from bench.methods import METHODS
from bench.protocols import PROTOCOLS, build_scenario
from bench.run import RESULTS, RunSpec, _model, _task_data, machine, make_run_plugins, run_backend, train_config
from bench.speed import SpeedBackend
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.strategy import Strategy, predict_logits

log = logging.getLogger("bench.step_speed")

MODES = {"eager": (False, False), "graph": (True, False), "eager-bf16": (False, True), "graph-bf16": (True, True)}


@dataclasses.dataclass(frozen=True)
class Setup:
    data: Any
    buffer: ReplayBuffer
    seen: list[int]
    old: list[int]


def _setup(protocol: str, method: str, buffer: int, device: str, mode: str, epochs: int) -> tuple[Strategy, Setup]:
    graph, bf16 = MODES[mode]
    spec = RunSpec(PROTOCOLS[protocol], METHODS[method], buffer, seed=0, device=device, amp_bf16=bf16, cuda_graph=graph)
    scenario = build_scenario(spec.protocol, 0)
    torch.manual_seed(0)
    model, prep, _, _ = _model(spec, scenario)
    hp = spec.method.resolved(buffer)
    # The run's own configuration, without head balancing: only the training steps are measured.
    cfg = dataclasses.replace(train_config(spec, hp, epochs), balance_epochs=0)
    first, second = scenario.tasks[0], scenario.tasks[1]
    d0 = _task_data(scenario.train.images, scenario.train.labels, first)
    model = model.to(device)  # type: ignore[assignment]
    logits = predict_logits(model, prep, d0.pixels, device)  # type: ignore[arg-type]
    buf = ReplayBuffer.empty(buffer if spec.method.uses_buffer else 0, spec.size, max_bytes=1 << 30)
    buf, _ = buf.updated_with_selection(d0, logits.astype(np.float16), seed=1, task=0)
    plugins = make_run_plugins(spec, hp)
    strategy = Strategy(model, prep, plugins, cfg, run_backend(spec))  # type: ignore[arg-type]
    data = _task_data(scenario.train.images, scenario.train.labels, second)
    return strategy, Setup(data, buf, sorted(set(first) | set(second)), list(first))


def _train(strategy: Strategy, s: Setup) -> tuple[float, int, int, float]:
    """(seconds, steps, images, final loss) of one experience."""
    dev = strategy.device
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    r = strategy.train_experience(s.data, s.buffer, s.seen, s.old, task_index=1)
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, r.steps, r.images_seen, r.final_loss


def compare(protocol: str, method: str, buffer: int, device: str, epochs: int) -> dict[str, Any]:
    """Eager and graphed training of one epoch from one state: final losses and largest weight gap."""
    eager, setup = _setup(protocol, method, buffer, device, "eager", epochs)
    graphed = copy.deepcopy(eager)
    graphed.backend = SpeedBackend(device, cuda_graph=True)
    _, _, _, loss_e = _train(eager, setup)
    _, _, _, loss_g = _train(graphed, setup)
    gap = max(
        float((a - b).abs().max() / (a.abs().max() + 1e-12))
        for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values(), strict=True)
        if a.is_floating_point()
    )
    return {"loss_eager": loss_e, "loss_graph": loss_g, "max_relative_weight_gap": gap}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    strategy, setup = _setup(args.protocol, args.method, args.buffer, args.device, args.mode, args.epochs)
    secs, steps, images, loss = _train(strategy, setup)
    return {"mode": args.mode, "seconds": secs, "steps": steps, "images": images, "final_loss": loss}


def measure(args: argparse.Namespace, mode: str, procs: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.step_speed", "--worker", "--mode", mode, "--method", args.method]
    cmd += ["--protocol", args.protocol, "--buffer", str(args.buffer), "--device", args.device]
    cmd += ["--epochs", str(args.epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    rows = []
    for p in ps:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}): {' '.join(cmd)}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    rates = [r["steps"] / r["seconds"] for r in rows]
    return {
        "mode": mode,
        "processes": procs,
        "steps_per_s_each": round(float(np.mean(rates)), 1),
        "steps_per_s_total": round(float(np.sum(rates)), 1),
        "images_per_s_total": round(float(sum(r["images"] / r["seconds"] for r in rows)), 0),
        "images_per_step": rows[0]["images"] / max(1, rows[0]["steps"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="cifar10-5", choices=sorted(PROTOCOLS))
    ap.add_argument("--method", default="derpp", choices=sorted(METHODS))
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--procs", default="1")
    ap.add_argument("--no-compare", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "step_speed.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="eager", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda"):
        raise SystemExit("bench.step_speed measures CUDA graphs: it needs --device cuda")
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    record: dict[str, Any] = {"protocol": args.protocol, "method": args.method, "buffer": args.buffer}
    # A failing mode is recorded with its error and the others still run: a lease is too short to
    # lose to one broken variant, and the planner (bench.gpu_plan) only uses modes that measured.
    if not args.no_compare:
        try:
            record["eager_vs_graph"] = compare(args.protocol, args.method, args.buffer, args.device, args.epochs)
        except Exception as e:  # noqa: BLE001 (recorded and printed, not hidden)
            record["eager_vs_graph"] = {"error": repr(e)}
        print("eager vs graph:", record["eager_vs_graph"], flush=True)
    rows: list[dict[str, Any]] = []
    for procs in (int(p) for p in args.procs.split(",")):
        for mode in args.modes.split(","):
            try:
                rows.append(measure(args, mode, procs))
            except Exception as e:  # noqa: BLE001 (recorded and printed, not hidden)
                rows.append({"mode": mode, "processes": procs, "error": repr(e)})
            print(rows[-1], flush=True)
    record.update(
        rows=rows,
        command=" ".join(["python", "-m", "bench.step_speed", *(sys.argv[1:] if argv is None else argv)]),
        git_commit=provenance.git_commit(),
        machine=machine(args.device),
        date=provenance.utc_now(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
