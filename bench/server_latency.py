"""Server latency against the bare Predictor: one 224x224 JPEG, one onnxruntime intra-op thread (default).

    python -m bench.server_latency                      # builds a 224-px store, then measures
    python -m bench.server_latency --workdir W          # measures W's CURRENT bundle

Without ``--workdir`` it makes a store in a temp dir: EfficientNet-Lite0 (offline ImageNet weights,
frozen backbone) at 224 px, concept table of the photo classes, one ``cvm update`` on three
classes of ``../shared/data/photos`` (25 photos each); the update exports and publishes the fp32 bundle.

Both sides do the same work per image (decode, resize/crop, normalise, run, top-5): the Predictor
in this process, the server as ``cvm serve --bundle DIR --threads 1`` in a subprocess, called
sequentially over one keep-alive connection. Rounds alternate between the two so drift in the
machine's load hits both. Writes ``bench/results/server_latency.json``.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.provenance import provenance
from cvm_edge.fsutil import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"
DEFAULT_OUT = REPO / "bench" / "results" / "server_latency.json"
TARGET_RATIO = 1.25


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


def measure(bundle: Path, image: bytes, requests: int, rounds: int, warmup: int, threads: int) -> dict[str, Any]:
    from deploy.predictor import Predictor, PredictorOptions

    predictor = Predictor(bundle, PredictorOptions(intra_op_threads=threads))
    port = _free_port()
    cmd = [sys.executable, "-m", "cvm_edge.cli", "serve", "--bundle", str(bundle), "--threads", str(threads)]
    cmd += ["--port", str(port), "--no-access-log"]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(server, port, log)
        client = _Client(port)
        server_reported: list[float] = []

        def call_server() -> None:
            status, body = client.request("POST", "/v1/classify", image, "image/jpeg")
            if status != 200:
                raise SystemExit(f"server answered {status}: {body[:200]!r}")
            server_reported.append(float(json.loads(body)["latency_ms"]))

        def call_predictor() -> None:
            predictor.classify([image], 5)

        timed(call_predictor, warmup)
        timed(call_server, warmup)
        server_reported.clear()
        bare: list[float] = []
        served: list[float] = []
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            bare += timed(call_predictor, per_round)
            served += timed(call_server, per_round)
        answer = json.loads(client.request("POST", "/v1/classify", image, "image/jpeg")[1])
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    p, s = _stats(bare), _stats(served)
    return {
        "predictor": p,
        "server_client_side": s,
        "server_reported_latency_ms": _stats(server_reported),
        "ratio_p50": round(s["p50_ms"] / p["p50_ms"], 4),
        "overhead_p50_ms": round(s["p50_ms"] - p["p50_ms"], 3),
        "example_answer": answer,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workdir", type=Path, default=None, help="store with a published bundle (default: build one)")
    ap.add_argument("--requests", type=int, default=300, help="timed calls per side")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds the calls are split into")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads on both sides")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    from deploy.bundle import current_bundle_dir

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cvm-bench-") as tmp:
        workdir = args.workdir or build_store(Path(tmp))
        bundle = current_bundle_dir(workdir)
        if bundle is None:
            raise SystemExit(f"{workdir} has no published bundle; run `cvm export --workdir {workdir}`")
        manifest = json.loads((bundle / "manifest.json").read_text())
        image, image_name = test_image()
        figures = measure(bundle, image, args.requests, args.rounds, args.warmup, args.threads)
    import onnxruntime as ort

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
            "backbone": manifest["model"]["backbone"],
            "image_size": manifest["image_size"],
            "classes": len(manifest["classes"]),
            "requests_per_side": args.requests,
            "rounds": args.rounds,
            "client": "stdlib http.client, sequential, one keep-alive connection, same machine",
            "work_per_call": "decode JPEG + resize/crop + normalise + onnxruntime run + top-5",
        },
        "figures": figures,
        "target": {"ratio_p50_at_most": TARGET_RATIO, "met": figures["ratio_p50"] <= TARGET_RATIO},
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    p, s = figures["predictor"], figures["server_client_side"]
    print(
        f"p50: Predictor {p['p50_ms']:.2f} ms, server {s['p50_ms']:.2f} ms "
        f"(ratio {figures['ratio_p50']:.3f}, target <= {TARGET_RATIO}); wrote {args.out}"
    )
    return 0 if figures["ratio_p50"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
