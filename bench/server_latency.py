"""Server latency against bare onnxruntime and the Predictor, and dynamic batching under concurrency.

    python -m bench.server_latency                      # builds a 224-px store (int8 bundle), then measures
    python -m bench.server_latency --workdir W          # measures W's CURRENT bundle
    python -m bench.server_latency --bundle B --concurrency 1,4,16

Without ``--workdir``/``--bundle`` it makes a store in a temp dir: EfficientNet-Lite0 (offline
ImageNet weights, frozen backbone) at 224 px, concept table of the photo classes, one ``cvm update``
on three classes of ``../shared/data/photos`` (25 photos each), which publishes the fp32 bundle,
then ``cvm export --precision P --images DATA`` (default int8, the issue-19 target).

SingleStream (one client, one keep-alive connection, one 224x224 JPEG per call), sides in
alternating rounds so drift in the machine's load hits all of them:

- ``ort``: a bare onnxruntime session (the Predictor's session options) on the pre-decoded,
  normalised tensor: the floor the server is measured against (issue 19: server / ORT <= 1.25);
- ``predictor``: ``Predictor.classify`` from the JPEG bytes, in this process;
- ``server``: ``cvm serve --bundle B --threads N`` as shipped (httptools + uvloop when installed);
- ``server_h11``: the same with ``--http h11 --loop asyncio`` (the stack before issue 19).

Besides wall time, each server's CPU seconds per request (``/proc/PID/stat``, user + system) are
recorded: on a shared machine they move far less with other load than latency does.

Concurrency (``--concurrency``): N client threads, each with its own keep-alive connection, post the
JPEG in a closed loop for ``--seconds``; a server with batching off (``--batch-window-ms 0``) and one
with the default window run side by side, alternating, ``--conc-rounds`` times. Throughput, p50 and
p99 per N. Writes ``bench/results/server_latency.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.provenance import provenance
from cvm_edge.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"
DEFAULT_OUT = REPO / "bench" / "results" / "server_latency.json"
TARGET_RATIO = 1.25  # server p50 / bare onnxruntime p50 (issue 19)
TARGET_BATCH_SPEEDUP = 1.5  # throughput, batching on / off, 16 clients
TARGET_P99_OVER_SINGLE = 4.0  # p99 at 16 clients with batching / single-stream p50


def _cvm(*argv: str) -> None:
    from cvm_edge.cli import main

    code = main(["-q", *argv])
    if code != 0:
        raise SystemExit(f"cvm {' '.join(argv)} failed with exit {code}")


def build_store(
    root: Path,
    classes: int = 3,
    backbone: str = "tf_efficientnet_lite0",
    image_size: int = 224,
    pretrained: str = "offline",
    train_backbone: str = "none",
    epochs: int = 1,
) -> Path:
    """A store trained on ``classes`` photo classes (default: 224-px Lite0, offline ImageNet weights,
    frozen backbone); its update exports and publishes the fp32 bundle. Returns the workdir."""
    from cvm_edge.concepts import slugify

    if not PHOTOS.is_dir():
        raise SystemExit(f"{PHOTOS} is absent; pass --workdir with a store that has a bundle")
    rows = list(csv.DictReader((PHOTOS / "labels.csv").open()))
    names = list(dict.fromkeys(r["class_name"] for r in sorted(rows, key=lambda r: int(r["label"]))))
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    _cvm("embed", "build", "--classes", str(root / "classes.txt"), "--out", str(root / "table.npz"))
    data = root / "data"
    for r in rows:  # photos 00-24 of each class train; 25-29 stay unseen (the latency image is one of them)
        if r["class_name"] in names[:classes] and int(Path(r["filename"]).stem.rsplit("_", 1)[1]) < 25:
            d = data / slugify(r["class_name"])
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(PHOTOS / r["filename"], d / r["filename"])
    wd = root / "w"
    _cvm(
        "init", "--workdir", str(wd), "--concepts", str(root / "table.npz"),
        "--backbone", backbone, "--pretrained", pretrained, "--image-size", str(image_size),
        "--train-backbone", train_backbone,
    )  # fmt: skip
    _cvm("update", "--workdir", str(wd), "--data", str(data), "--epochs", str(epochs), "--no-progress")
    return wd


def export_precision(workdir: Path, precision: str, images: Path) -> None:
    """``cvm export --precision P`` with its parity gate (the analytic store keeps no images: the
    training photos are its calibration and parity set)."""
    if precision != "fp32":
        _cvm("export", "--workdir", str(workdir), "--precision", precision, "--images", str(images))


def test_image() -> tuple[bytes, str]:
    """A real 224x224 JPEG photo, or a synthetic one when the shared photos are absent."""
    path = PHOTOS / "tench_29.jpg"  # a class the built store learns, not one of its training photos
    if path.is_file():
        return path.read_bytes(), str(path.relative_to(REPO.parent))
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue(), "synthetic 224x224 JPEG"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Milliseconds of ``n`` calls of ``fn``, one by one."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(1000.0 * (time.perf_counter() - t0))
    return out


def _stats(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
        "n": len(a),
    }


class _Client:
    """A minimal keep-alive HTTP client (stdlib), so the figure is the server's time, not a client
    library's: httpx alone adds about a millisecond per call."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
        headers = {"Content-Type": ctype} if ctype else {}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self) -> None:
        self.conn.close()


def _wait_ready(server: subprocess.Popen[bytes], port: int, log: Any) -> None:
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise SystemExit(f"server did not start:\n{log.read().decode(errors='replace')}")
        try:
            c = _Client(port)
            status, _ = c.request("GET", "/v2/health/ready")
            c.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(bundle: Path, threads: int, extra: Sequence[str] = ()) -> Iterator[tuple[int, int]]:
    """``cvm serve --bundle B --threads N [extra]`` in a subprocess, ready; yields (port, pid)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "cvm_edge.cli", "serve", "--bundle", str(bundle), "--threads", str(threads)]
    cmd += ["--port", str(port), "--no-access-log", *extra]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(server, port, log)
        yield port, server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


SERVERS = {"server": (), "server_h11": ("--http", "h11", "--loop", "asyncio")}


def measure(bundle: Path, image: bytes, requests: int, rounds: int, warmup: int, threads: int) -> dict[str, Any]:
    """SingleStream: bare ORT, Predictor, and the servers of SERVERS, in alternating rounds."""
    import onnxruntime as ort

    from cvm_edge.preprocess import normalise
    from deploy.predictor import INPUT_NAME, Predictor, PredictorOptions, session_options

    opts = PredictorOptions(intra_op_threads=threads)
    predictor = Predictor(bundle, opts)
    feed = {INPUT_NAME: normalise(predictor.pixels(image), predictor.prep)}
    session = ort.InferenceSession(
        str(bundle / "model.onnx"), session_options(opts), providers=["CPUExecutionProvider"]
    )
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(server_process(bundle, threads, extra)) for name, extra in SERVERS.items()}
        clients = {name: _Client(port) for name, (port, _) in servers.items()}
        reported: list[float] = []

        def call(name: str) -> Callable[[], None]:
            def go() -> None:
                status, body = clients[name].request("POST", "/v1/classify", image, "image/jpeg")
                if status != 200:
                    raise SystemExit(f"{name} answered {status}: {body[:200]!r}")
                if name == "server":
                    reported.append(float(json.loads(body)["latency_ms"]))

            return go

        sides: dict[str, Callable[[], Any]] = {
            "ort": lambda: session.run(None, feed),
            "predictor": lambda: predictor.classify([image], 5),
            **{name: call(name) for name in servers},
        }
        for fn in sides.values():
            timed(fn, warmup)
        reported.clear()
        samples: dict[str, list[float]] = {k: [] for k in sides}
        cpu = {name: 0.0 for name in servers}
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for side, fn in sides.items():
                c0 = _cpu_seconds(servers[side][1]) if side in servers else 0.0
                samples[side] += timed(fn, per_round)
                if side in servers:
                    cpu[side] += _cpu_seconds(servers[side][1]) - c0
        answer = json.loads(clients["server"].request("POST", "/v1/classify", image, "image/jpeg")[1])
        for c in clients.values():
            c.close()
    st = {k: _stats(v) for k, v in samples.items()}
    p50 = {k: v["p50_ms"] for k, v in st.items()}
    return {
        "sides": st,
        "server_reported_latency_ms": _stats(reported),
        "server_cpu_ms_per_request": {k: round(1000 * v / len(samples[k]), 3) for k, v in cpu.items()},
        "ratio_p50": round(p50["server"] / p50["ort"], 4),  # the issue-19 target
        "server_over_predictor": round(p50["server"] / p50["predictor"], 4),
        "server_h11_over_ort": round(p50["server_h11"] / p50["ort"], 4),
        "overhead_p50_ms": round(p50["server"] - p50["ort"], 3),
        "overhead_h11_p50_ms": round(p50["server_h11"] - p50["ort"], 3),
        "example_answer": answer,
    }


def closed_loop(port: int, image: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each on its own keep-alive connection, posting ``image`` back to back."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop = [0.0]

    def run(i: int) -> None:
        c = _Client(port)
        c.request("GET", "/v2/health/live")
        start.wait()
        while time.perf_counter() < stop[0]:
            t0 = time.perf_counter()
            try:
                status, body = c.request("POST", "/v1/classify", image, "image/jpeg")
            except (OSError, http.client.HTTPException) as exc:  # counted; a new connection goes on
                errors.append(repr(exc))
                c.close()
                c = _Client(port)
                continue
            lat[i].append(1000.0 * (time.perf_counter() - t0))
            if status != 200:
                errors.append(f"{status}: {body[:100]!r}")
        c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [x for per in lat for x in per]
    return {"requests": len(flat), "seconds": round(wall, 3), "throughput_rps": round(len(flat) / wall, 1),
            "errors": len(errors), "error_sample": errors[:3], **{k: v for k, v in _stats(flat).items() if k != "n"}}  # fmt: skip


def _batch_runs(port: int) -> tuple[float, float]:
    """(runs, images) of the server's cvm_batch_images histogram."""
    c = _Client(port)
    text = c.request("GET", "/metrics")[1].decode()
    c.close()
    got = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for k in got:
            if line.startswith(f"cvm_batch_images_{k} "):
                got[k] = float(line.split()[-1])
    return got["count"], got["sum"]


def measure_concurrency(
    bundle: Path, image: bytes, threads: int, levels: Sequence[int], seconds: float, rounds: int, window_ms: float
) -> dict[str, Any]:
    """Batching off against on, side by side: per client count, ``rounds`` alternating runs each."""
    modes = {"off": ("--batch-window-ms", "0"), "on": ("--batch-window-ms", f"{window_ms:g}")}
    out: dict[str, Any] = {"window_ms": window_ms, "seconds_per_run": seconds, "rounds": rounds, "levels": {}}
    with contextlib.ExitStack() as stack:
        ports = {m: stack.enter_context(server_process(bundle, threads, extra))[0] for m, extra in modes.items()}
        for port in ports.values():
            closed_loop(port, image, 4, 1.0)  # warm-up
        for n in levels:
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            before = _batch_runs(ports["on"])
            for _ in range(rounds):
                for m, port in ports.items():
                    runs[m].append(closed_loop(port, image, n, seconds))
            after = _batch_runs(ports["on"])
            level: dict[str, Any] = {}
            for m, rs in runs.items():
                level[m] = {
                    "throughput_rps": round(float(np.median([r["throughput_rps"] for r in rs])), 1),
                    "p50_ms": round(float(np.median([r["p50_ms"] for r in rs])), 3),
                    "p99_ms": round(float(np.median([r["p99_ms"] for r in rs])), 3),
                    "errors": sum(r["errors"] for r in rs),
                    "runs": rs,
                }
            runs_on, images_on = after[0] - before[0], after[1] - before[1]
            level["on"]["mean_batch_images"] = round(images_on / runs_on, 3) if runs_on else None
            level["throughput_on_over_off"] = round(level["on"]["throughput_rps"] / level["off"]["throughput_rps"], 4)
            out["levels"][str(n)] = level
    single = out["levels"].get("1")
    top = out["levels"].get(str(max(levels)))
    if single and top:
        out["p99_on_over_single_stream_p50"] = round(top["on"]["p99_ms"] / single["on"]["p50_ms"], 3)
    return out


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--workdir", type=Path, default=None, help="store with a published bundle (default: build one)")
    src.add_argument("--bundle", type=Path, default=None, help="one bundle directory")
    ap.add_argument("--precision", default="int8", choices=("fp32", "fp16", "int8"), help="bundle of the built store")
    ap.add_argument("--requests", type=int, default=600, help="timed calls per side")
    ap.add_argument("--rounds", type=int, default=12, help="alternating rounds the calls are split into")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads on every side")
    ap.add_argument("--concurrency", type=_levels, default=(1, 4, 16), help="client counts (empty: skip)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per concurrency run")
    ap.add_argument("--conc-rounds", type=int, default=3, help="alternating off/on runs per client count")
    ap.add_argument("--window-ms", type=float, default=2.0, help="batch window of the batching-on server")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    from deploy.bundle import current_bundle_dir, int8_weights_of

    t0 = time.time()
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="cvm-bench-") as tmp:
        if args.bundle is not None:
            bundle: Path | None = args.bundle
        else:
            workdir = args.workdir
            if workdir is None:
                workdir = build_store(Path(tmp))
                export_precision(workdir, args.precision, Path(tmp) / "data")
            bundle = current_bundle_dir(workdir)
        if bundle is None:
            raise SystemExit(f"{workdir} has no published bundle; run `cvm export --workdir {workdir}`")
        manifest = json.loads((bundle / "manifest.json").read_text())
        image, image_name = test_image()
        figures = measure(bundle, image, args.requests, args.rounds, args.warmup, args.threads)
        conc = None
        if args.concurrency:
            conc = measure_concurrency(
                bundle, image, args.threads, args.concurrency, args.seconds, args.conc_rounds, args.window_ms
            )
    import onnxruntime as ort

    targets: dict[str, Any] = {
        "server_over_ort_p50": {"at_most": TARGET_RATIO, "value": figures["ratio_p50"]},
    }
    top = conc["levels"].get("16") if conc else None
    if conc and top:
        targets["batching_throughput_16_clients"] = {
            "at_least": TARGET_BATCH_SPEEDUP, "value": top["throughput_on_over_off"]}  # fmt: skip
        targets["p99_16_clients_over_single_stream_p50"] = {
            "below": TARGET_P99_OVER_SINGLE, "value": conc.get("p99_on_over_single_stream_p50")}  # fmt: skip
    for t in targets.values():
        v = t["value"]
        t["met"] = v is not None and (
            v <= t["at_most"] if "at_most" in t else v >= t["at_least"] if "at_least" in t else v < t["below"]
        )
    result: dict[str, Any] = {
        "benchmark": "server_latency",
        **provenance("python -m bench.server_latency", sys.argv[1:] if argv is None else argv),
        "setup": {
            "providers": ort.get_available_providers(),
            "image": image_name,
            "image_bytes": len(image),
            "intra_op_threads": args.threads,
            "bundle": manifest["name"],
            "precision": manifest["precision"],
            # int8 only: U8S8 ("int8") or U8U8 ("uint8") weights (deploy/cpu.py)
            "int8_weights": int8_weights_of(manifest),
            "backbone": manifest["model"]["backbone"],
            "image_size": manifest["image_size"],
            "classes": len(manifest["classes"]),
            "requests_per_side": args.requests,
            "rounds": args.rounds,
            "client": "stdlib http.client, one keep-alive connection per client thread, same machine",
            "work_per_call": "decode JPEG + resize/crop + normalise + onnxruntime run + top-5",
        },
        "figures": figures,
        "concurrency": conc,
        "targets": targets,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],  # machine's: when written
        "wall_s": round(time.time() - t0, 1),
    }
    result["machine"]["load_average_at_start"] = load_at_start  # provenance() ran at the end
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    st = figures["sides"]
    print(
        f"p50 ms: ORT {st['ort']['p50_ms']:.2f}, Predictor {st['predictor']['p50_ms']:.2f}, server "
        f"{st['server']['p50_ms']:.2f} (h11/asyncio {st['server_h11']['p50_ms']:.2f}); server / ORT "
        f"{figures['ratio_p50']:.3f} (target <= {TARGET_RATIO}); server CPU ms/request "
        f"{figures['server_cpu_ms_per_request']}"
    )
    if conc:
        for n, lv in conc["levels"].items():
            print(
                f"{n:>3} clients: off {lv['off']['throughput_rps']:.0f} req/s p99 {lv['off']['p99_ms']:.1f} ms | "
                f"on {lv['on']['throughput_rps']:.0f} req/s p99 {lv['on']['p99_ms']:.1f} ms, mean batch "
                f"{lv['on']['mean_batch_images']} | on/off {lv['throughput_on_over_off']:.3f}"
            )
    print(f"wrote {args.out}")
    return 0 if all(t["met"] for t in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
