"""Inference latency and throughput, MLPerf SingleStream style: one query at a time, one JPEG per query.

    python -m bench.inference                       # both backbones, fp32/fp16/int8, 1 and 2 threads
    python -m bench.inference --quick               # a short run (fewer queries, fp32, 1 thread)
    python -m bench.inference --models resnet18_cifar --threads 1 --precisions fp32,int8 --work /tmp/w

For each backbone (the default, pretrained EfficientNet-Lite0 ``tf_efficientnet_lite0`` at 224 px, and
the 32-px benchmark backbone ``resnet18_cifar``) it builds a store the product's way (``cvm embed
build``, ``cvm init``, one ``cvm update`` on three photo classes of ``../shared/data/photos``, which
exports the fp32 bundle), exports the fp16 and int8 bundles with ``cvm export``'s code and parity
gates, and then, for each intra-op thread count and precision, times in alternating rounds:

- ``ort_defaults``: a bare onnxruntime session on the bundle's ``model.onnx`` with onnxruntime's
  default options (only the thread count set), fed the pre-decoded, normalised input tensor;
- ``ort``: the same, with the Predictor's session options (``deploy.predictor.session_options``);
- ``predictor``: ``Predictor.classify`` from the JPEG bytes (decode, resize/crop, normalise, run, top-5);
- ``server``: ``cvm serve --bundle B --threads N`` (uvicorn, a separate process) over HTTP on
  loopback, one client, one keep-alive connection, the JPEG as the raw body;
- ``torch_eager`` (fp32 only): the checkpoint's own torch graph on the pre-decoded tensor.

Every side answers at least ``--queries`` (default 1,024) timed queries after its warm-up; p50/p90/p99,
mean and throughput (queries per second of summed latency) are recorded. Also measured: the model's
FLOPs (``torch.utils.flop_counter.FlopCounterMode`` on the fp32 torch graph at batch 1: convolutions
and matrix products as 2 x multiply-accumulates; element-wise ops are not counted) and the machine's
peak matmul rate (best torch/MKL float32 ``mm`` of square matrices, per thread count, measured before
and after each model; the best is the peak), so the floor (FLOPs / rate) and each side's ratio to it
are printed. Sides alternate in 32 rounds per configuration, so a burst of other load on the machine
hits every side alike. A preprocessing section times the decode of
the query JPEG and of a 12-MP JPEG (with and without the reduced-scale JPEG decode), and a batch
section a multi-file request of 8 images through one session call. Writes ``bench/results/inference.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.provenance import provenance
from bench.server_latency import PHOTOS, _Client, _free_port, _wait_ready, build_store, timed
from cvm_edge.fsutil import atomic_write_text
from cvm_edge.preprocess import normalise

log = logging.getLogger("bench.inference")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "inference.json"
QUERY_PHOTO = "tench_29.jpg"  # a class the built stores learn, not one of their training photos
PRECISIONS = ("fp32", "fp16", "int8")
SIDES = ("ort_defaults", "ort", "predictor", "server", "torch_eager")
TARGETS = {"predictor_over_ort": 1.10, "server_over_predictor": 1.25, "ort_over_floor": 3.0}
BATCH = 8  # images of the multi-file request in the batch section


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    backbone: str
    image_size: int
    pretrained: str
    train_backbone: str
    epochs: int
    role: str


MODELS = {
    "tf_efficientnet_lite0": ModelSpec("tf_efficientnet_lite0", 224, "offline", "none", 1, "default backbone"),
    "resnet18_cifar": ModelSpec("resnet18_cifar", 32, "none", "all", 3, "32-px benchmark backbone"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    queries: int
    warmup: int
    rounds: int
    threads: tuple[int, ...]
    precisions: tuple[str, ...]


# ----- statistics ---------------------------------------------------------------------------------
def stats(ms: Sequence[float]) -> dict[str, float]:
    """Latency percentiles of one side, and SingleStream throughput (queries per second of latency)."""
    a = np.asarray(ms, dtype=np.float64)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p90_ms": round(float(np.percentile(a, 90)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "mean_ms": round(float(a.mean()), 4),
        "min_ms": round(float(a.min()), 4),
        "n": len(a),
        "throughput_qps": round(float(1000.0 * len(a) / a.sum()), 2),
    }


# ----- machine and model figures --------------------------------------------------------------------
def peak_matmul(threads: Sequence[int], sizes: Sequence[int] = (512, 1024, 2048), repeats: int = 5) -> dict[str, Any]:
    """The best float32 matmul rate of this CPU per thread count (torch.mm on MKL/oneDNN sgemm)."""
    import torch

    before = torch.get_num_threads()
    per: dict[str, Any] = {}
    try:
        for th in threads:
            torch.set_num_threads(th)
            rates = {}
            for n in sizes:
                a, b = torch.randn(n, n), torch.randn(n, n)
                for _ in range(2):
                    torch.mm(a, b)
                best = min(timed(functools.partial(torch.mm, a, b), repeats)) / 1000.0
                rates[str(n)] = round(2.0 * n**3 / best / 1e9, 2)
            per[str(th)] = {"gflops": max(rates.values()), "by_size": rates}
    finally:
        torch.set_num_threads(before)
    return {
        "method": f"torch.mm float32 of n x n matrices (n in {list(sizes)}), best of {repeats}, 2 n^3 FLOPs each; "
        "the best size's rate per thread count",
        "threads": per,
    }


def count_flops(graph: Any, image_size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        graph(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


# ----- stores, bundles, query image --------------------------------------------------------------------
def ensure_store(spec: ModelSpec, work: Path) -> Path:
    """The store for ``spec`` under ``work`` (built the product's way when absent)."""
    from deploy.bundle import current_bundle_dir

    root = work / spec.backbone
    wd = root / "w"
    if wd.is_dir() and current_bundle_dir(wd) is not None:
        log.info("reusing the %s store in %s", spec.backbone, wd)
        return wd
    root.mkdir(parents=True, exist_ok=True)
    log.info("building a %s store (%d px, %s)", spec.backbone, spec.image_size, spec.pretrained)
    return build_store(
        root,
        backbone=spec.backbone,
        image_size=spec.image_size,
        pretrained=spec.pretrained,
        train_backbone=spec.train_backbone,
        epochs=spec.epochs,
    )


def ensure_bundles(workdir: Path, precisions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """precision -> {"path", "name", "bytes", "parity"} or {"error"} when its gate refused it."""
    from cvm_edge.checkpoints import CheckpointStore
    from deploy.bundle import bundles_root, latest_bundle_of, load_bundle
    from deploy.export import ExportOptions, export_locked

    ckpt = CheckpointStore(workdir).load()
    version = ckpt.version
    # An analytic store (cvm init's default on a pretrained backbone) keeps no images: its parity check
    # and int8 calibration take the photos its update learned from (build_store's data folder).
    images = workdir.parent / "data" if len(ckpt.buffer) == 0 else None
    out: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        name = latest_bundle_of(workdir, version, precision)
        if name is None:
            try:
                name = export_locked(workdir, version, ExportOptions(precision=precision), images_dir=images).name
            except Exception as exc:  # noqa: BLE001 - a refused precision is a result, not a crash
                log.warning("%s export refused: %s", precision, exc)
                out[precision] = {"error": str(exc)}
                continue
        bundle = load_bundle(bundles_root(workdir) / name)
        parity = bundle.manifest["parity"]
        out[precision] = {
            "path": bundle.path,
            "name": name,
            "model_bytes": bundle.manifest["model_bytes"],
            "parity": {k: parity.get(k) for k in ("top1_agreement", "min_embedding_cosine", "max_abs_embedding_diff")},
            # int8: U8S8 ("int8") or U8U8 ("uint8") weights, chosen for the exporting CPU (deploy/cpu.py)
            "int8_weights": bundle.int8_weights,
        }
    return out


def query_image(size: int) -> tuple[bytes, str]:
    """A real photo as a ``size`` x ``size`` JPEG (the 224-px photos are sent as they are)."""
    from PIL import Image

    path = PHOTOS / QUERY_PHOTO
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    if img.size == (size, size):
        return data, f"{path.relative_to(REPO.parent)} ({size}x{size} JPEG, {len(data)} bytes)"
    buf = io.BytesIO()
    img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    out = buf.getvalue()
    return out, f"{path.relative_to(REPO.parent)} resized to {size}x{size}, JPEG q90, {len(out)} bytes"


# ----- the sides --------------------------------------------------------------------------------------
@contextmanager
def server_process(bundle: Path, threads: int) -> Iterator[int]:
    """``cvm serve --bundle B --threads N`` in a subprocess, ready; yields its port."""
    port = _free_port()
    cmd = [sys.executable, "-m", "cvm_edge.cli", "serve", "--bundle", str(bundle), "--threads", str(threads)]
    cmd += ["--port", str(port), "--no-access-log"]
    logf = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, port, logf)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


def measure_config(
    bundle: Path,
    threads: int,
    image: bytes,
    torch_graph: Any | None,
    settings: Settings,
    progress: tqdm,
) -> dict[str, Any]:
    """All sides of one (bundle, threads) configuration, in alternating rounds."""
    import onnxruntime as ort

    from deploy.predictor import INPUT_NAME, Predictor, PredictorOptions, session_options

    opts = PredictorOptions(intra_op_threads=threads)
    predictor = Predictor(bundle, opts)
    x_in = normalise(predictor.pixels(image), predictor.prep)  # the pre-decoded input of the bare sides
    model = str(bundle / "model.onnx")
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    bare = ort.InferenceSession(model, plain, providers=["CPUExecutionProvider"])
    tuned = ort.InferenceSession(model, session_options(opts), providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: x_in}
    calls: dict[str, Callable[[], Any]] = {
        "ort_defaults": lambda: bare.run(None, feed),
        "ort": lambda: tuned.run(None, feed),
        "predictor": lambda: predictor.classify([image], 5),
    }
    if torch_graph is not None:
        import torch

        torch.set_num_threads(threads)
        xt = torch.from_numpy(x_in)  # shares the numpy buffer: no copy

        def run_torch() -> None:
            with torch.inference_mode():
                torch_graph(xt)

        calls["torch_eager"] = run_torch
    with server_process(bundle, threads) as port:
        client = _Client(port)

        def call_server() -> None:
            status, body = client.request("POST", "/v1/classify", image, "image/jpeg")
            if status != 200:
                raise SystemExit(f"server answered {status}: {body[:200]!r}")

        def reconnect() -> None:
            """A fresh keep-alive connection and one untimed request before each server round:
            uvicorn closes a connection idle for 5 s, and the other sides' rounds take longer."""
            nonlocal client
            client.close()
            client = _Client(port)
            call_server()

        calls["server"] = call_server
        order = [s for s in SIDES if s in calls]
        for side in order:
            timed(calls[side], settings.warmup)
        samples: dict[str, list[float]] = {s: [] for s in order}
        per_round = -(-settings.queries // settings.rounds)
        for _ in range(settings.rounds):
            for side in order:
                if side == "server":
                    reconnect()
                samples[side] += timed(calls[side], per_round)
                progress.update(per_round)
        reconnect()
        answer = json.loads(client.request("POST", "/v1/classify", image, "image/jpeg")[1])
        client.close()
    same = answer["predictions"][0]["label"] == predictor.classify([image], 1)[0][0]["label"]
    batch = batch_figures(predictor, image, max(4, settings.queries // (4 * BATCH)))
    return {
        "sides": {s: stats(v) for s, v in samples.items()},
        "server_answer": answer["predictions"][:3],
        "server_and_predictor_agree": same,
        "batch": batch,
        "providers": predictor.providers,
    }


def batch_figures(predictor: Any, image: bytes, calls: int) -> dict[str, Any]:
    """A multi-file request of BATCH images: one session call (Predictor.classify) against BATCH
    single-image calls, in images per second."""
    images = [image] * BATCH
    one = lambda: predictor.classify(images, 5)  # noqa: E731
    single = lambda: [predictor.classify([im], 5) for im in images]  # noqa: E731
    timed(one, 2)
    batched_ms = float(np.median(timed(one, calls)))
    single_ms = float(np.median(timed(single, calls)))
    return {
        "images": BATCH,
        "one_session_call_ms": round(batched_ms, 3),
        "one_call_per_image_ms": round(single_ms, 3),
        "images_per_s_batched": round(1000.0 * BATCH / batched_ms, 1),
        "images_per_s_single": round(1000.0 * BATCH / single_ms, 1),
    }


def preprocess_figures(prep_dict: dict[str, Any], image: bytes, repeats: int) -> dict[str, Any]:
    """Decode + resize/crop and normalise of the query JPEG, and of a 12-MP JPEG with and without the
    reduced-scale JPEG decode (``Preprocessing.jpeg_draft``)."""
    from PIL import Image

    from cvm_edge.preprocess import Preprocessing, load_pixels, normalise

    prep = Preprocessing.from_dict(prep_dict)
    full = dataclasses.replace(prep, jpeg_draft=False)
    drafted = dataclasses.replace(prep, jpeg_draft=True)
    px = load_pixels(image, prep)
    big = io.BytesIO()
    Image.open(PHOTOS / QUERY_PHOTO).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC).save(
        big, "JPEG", quality=90
    )
    big_bytes = big.getvalue()
    few = max(3, repeats // 20)

    def p50(fn: Callable[[], Any], n: int) -> float:
        timed(fn, 2)
        return round(float(np.median(timed(fn, n))), 4)

    return {
        "query_decode_resize_ms": p50(lambda: load_pixels(image, prep), repeats),
        "query_normalise_ms": p50(lambda: normalise(px, prep), repeats),
        "jpeg_4032x3024_bytes": len(big_bytes),
        "jpeg_4032x3024_full_decode_ms": p50(lambda: load_pixels(big_bytes, full), few),
        "jpeg_4032x3024_draft_decode_ms": p50(lambda: load_pixels(big_bytes, drafted), few),
    }


# ----- one model --------------------------------------------------------------------------------------
def run_model(spec: ModelSpec, work: Path, settings: Settings, progress: tqdm) -> dict[str, Any]:
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.loading import model_from_checkpoint
    from deploy.export import ExportGraph

    workdir = ensure_store(spec, work)
    bundles = ensure_bundles(workdir, settings.precisions)
    ckpt = CheckpointStore(workdir).load()
    graph = ExportGraph(model_from_checkpoint(ckpt), ckpt.seen).eval()
    flops = count_flops(graph, spec.image_size)
    image, image_name = query_image(spec.image_size)
    runs = []
    for threads in settings.threads:
        for precision in settings.precisions:
            b = bundles[precision]
            if "error" in b:
                runs.append({"threads": threads, "precision": precision, "error": b["error"]})
                continue
            progress.set_description(f"{spec.backbone} {precision} {threads}t")
            fig = measure_config(b["path"], threads, image, graph if precision == "fp32" else None, settings, progress)
            s = fig["sides"]
            p50 = {k: v["p50_ms"] for k, v in s.items()}
            fig.update(
                threads=threads,
                precision=precision,
                bundle=b["name"],
                ratios={
                    "predictor_over_ort": round(p50["predictor"] / p50["ort"], 4),
                    "predictor_over_ort_defaults": round(p50["predictor"] / p50["ort_defaults"], 4),
                    "server_over_predictor": round(p50["server"] / p50["predictor"], 4),
                },
            )
            runs.append(fig)
    return {
        "backbone": spec.backbone,
        "role": spec.role,
        "image_size": spec.image_size,
        "pretrained": spec.pretrained,
        "store": f"one cvm update ({spec.train_backbone} backbone training, {spec.epochs} epoch(s)) on 3 photo classes",
        "classes": len(ckpt.seen),
        "query_image": image_name,
        "flops": flops,
        "gflops": round(flops / 1e9, 4),
        "flops_method": "torch.utils.flop_counter.FlopCounterMode on the fp32 torch graph, batch 1; convolutions "
        "and matrix products as 2 x multiply-accumulates, element-wise ops not counted",
        "bundles": {p: {k: v for k, v in b.items() if k != "path"} for p, b in bundles.items()},
        "preprocessing": preprocess_figures(ckpt.prep.to_dict(), image, max(20, settings.queries // 4)),
        "runs": runs,
    }


def merge_peaks(*peaks: dict[str, Any]) -> dict[str, Any]:
    """The best rate of several peak_matmul measurements per thread count (a peak is what the CPU can
    do; a measurement that overlapped other work only underestimates it)."""
    out: dict[str, Any] = {"method": peaks[0]["method"] + f"; best of {len(peaks)} measurements", "threads": {}}
    for th in peaks[0]["threads"]:
        best = max((p["threads"][th] for p in peaks), key=lambda v: float(v["gflops"]))
        out["threads"][th] = {**best, "all_measurements_gflops": [p["threads"][th]["gflops"] for p in peaks]}
    return out


def add_floor(models: Sequence[dict[str, Any]], peak: dict[str, Any]) -> None:
    """floor_ms = FLOPs / peak rate of the run's thread count, and each side's p50 over it."""
    for m in models:
        for r in m["runs"]:
            if "error" in r:
                continue
            floor_ms = m["flops"] / (float(peak["threads"][str(r["threads"])]["gflops"]) * 1e9) * 1000.0
            r["floor_ms"] = round(floor_ms, 4)
            for side, st in r["sides"].items():
                r["ratios"][f"{side}_over_floor"] = round(st["p50_ms"] / floor_ms, 4)


def targets(models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, on the default backbone (fp32, 1 thread) when it was measured."""
    out = []
    for m in models:
        if m["backbone"] != "tf_efficientnet_lite0":
            continue
        for r in m["runs"]:
            if r.get("precision") != "fp32" or r.get("threads") != 1 or "error" in r:
                continue
            for key, limit in TARGETS.items():
                value = r["ratios"][key]
                out.append(
                    {
                        "target": key,
                        "where": f"{m['backbone']} {m['image_size']} px, fp32, 1 intra-op thread, p50",
                        "value": value,
                        "at_most": limit,
                        "met": value <= limit,
                    }
                )
    return out


# ----- output -----------------------------------------------------------------------------------------
def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    peak = result["peak_matmul"]["threads"]
    lines.append("peak matmul: " + ", ".join(f"{t} thread(s) {v['gflops']:.1f} GFLOP/s" for t, v in peak.items()))
    head = (
        f"{'model':<22} {'prec':<5} {'thr':>3} {'floor':>7} {'ort_def':>8} {'ort':>8} {'predict':>8} "
        f"{'server':>8} {'torch':>8} {'pred/ort':>8} {'srv/pred':>8} {'ort/flr':>8}"
    )
    lines.append(head + "   (p50 ms)")
    for m in result["models"]:
        for r in m["runs"]:
            name = f"{m['backbone']}@{m['image_size']}"
            if "error" in r:
                lines.append(f"{name:<22} {r['precision']:<5} {r['threads']:>3} refused: {r['error'][:80]}")
                continue
            s, q = r["sides"], r["ratios"]
            torch_p50 = f"{s['torch_eager']['p50_ms']:8.2f}" if "torch_eager" in s else f"{'-':>8}"
            lines.append(
                f"{name:<22} {r['precision']:<5} {r['threads']:>3} {r['floor_ms']:7.2f} "
                f"{s['ort_defaults']['p50_ms']:8.2f} {s['ort']['p50_ms']:8.2f} {s['predictor']['p50_ms']:8.2f} "
                f"{s['server']['p50_ms']:8.2f} {torch_p50} {q['predictor_over_ort']:8.3f} "
                f"{q['server_over_predictor']:8.3f} {q['ort_over_floor']:8.3f}"
            )
        lines.append(f"{m['backbone']}: {m['gflops']:.3f} GFLOPs per image")
    for t in result["targets"]:
        lines.append(f"target {t['target']} <= {t['at_most']}: {t['value']:.3f} ({'met' if t['met'] else 'MISSED'})")
    return lines


def _csv(value: str, allowed: Sequence[str] | None = None, cast: Callable[[str], Any] = str) -> tuple[Any, ...]:
    items = tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    if allowed is not None and (bad := [v for v in items if v not in allowed]):
        raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, bad))}; choose from {', '.join(allowed)}")
    if not items:
        raise argparse.ArgumentTypeError("give at least one value")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.inference", description=__doc__.splitlines()[0] if __doc__ else None
    )
    ap.add_argument("--quick", action="store_true", help="a short run: 64 queries, 8 warm-up, 2 rounds, fp32, 1 thread")
    ap.add_argument("--models", type=lambda v: _csv(v, tuple(MODELS)), default=tuple(MODELS))
    ap.add_argument("--threads", type=lambda v: _csv(v, cast=int), default=None, help="default 1,2 (quick: 1)")
    ap.add_argument(
        "--precisions", type=lambda v: _csv(v, PRECISIONS), default=None, help="default fp32,fp16,int8 (quick: fp32)"
    )
    ap.add_argument("--queries", type=int, default=None, help="timed queries per side (default 1024; quick 64)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed queries per side first (default 64; quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 32; quick 2)")
    ap.add_argument("--work", type=Path, default=None, help="keep/reuse the built stores here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--note", default="", help="recorded with the result (e.g. the machine's load conditions)")
    args = ap.parse_args(argv)
    if any(t < 1 for t in args.threads or ()):
        ap.error("--threads must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    q = args.quick
    return Settings(
        queries=args.queries or (64 if q else 1024),
        warmup=args.warmup if args.warmup is not None else (8 if q else 64),
        rounds=args.rounds or (2 if q else 32),
        threads=args.threads or ((1,) if q else (1, 2)),
        precisions=args.precisions or (("fp32",) if q else PRECISIONS),
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    settings = settings_from(args)
    if not (PHOTOS / QUERY_PHOTO).is_file():
        raise SystemExit(f"{PHOTOS} is absent: the stores are trained on, and queried with, those photos")
    t0 = time.time()
    prov = provenance("python -m bench.inference", sys.argv[1:] if argv is None else list(argv))
    repeats = 3 if args.quick else 5
    peaks = [peak_matmul(settings.threads, repeats=repeats)]
    sides_per_config = len(SIDES) - 1
    total = sum(
        settings.rounds * -(-settings.queries // settings.rounds) * (sides_per_config + (p == "fp32"))
        for _ in args.models
        for _ in settings.threads
        for p in settings.precisions
    )
    models = []
    with tempfile.TemporaryDirectory(prefix="cvm-bench-inf-") as tmp, tqdm(total=total, unit="q") as progress:
        work = args.work or Path(tmp)
        for name in args.models:
            models.append(run_model(MODELS[name], work, settings, progress))
            peaks.append(peak_matmul(settings.threads, repeats=repeats))  # again after each model
    peak = merge_peaks(*peaks)
    add_floor(models, peak)
    import onnxruntime as ort

    result: dict[str, Any] = {
        "benchmark": "inference",
        "scenario": "MLPerf-style SingleStream: one query (one JPEG) at a time, next query when the previous "
        "answered; latency per query, p50/p90/p99; throughput = queries per second of summed latency",
        **prov,
        "quick": bool(args.quick),
        "note": args.note,
        "settings": dataclasses.asdict(settings),
        "providers": ort.get_available_providers(),
        "sides": {
            "ort_defaults": "bare onnxruntime session, onnxruntime's default options (thread count set), "
            "pre-decoded normalised float32 input",
            "ort": "bare onnxruntime session with the Predictor's session options, pre-decoded input",
            "predictor": "deploy.predictor.Predictor.classify from the JPEG bytes (decode, resize/crop, "
            "normalise, run, top-5)",
            "server": "cvm serve --bundle B --threads N (uvicorn subprocess), stdlib HTTP client on loopback, "
            "one keep-alive connection, raw JPEG body",
            "torch_eager": "the checkpoint's torch graph (fp32, eval, inference_mode), pre-decoded input",
        },
        "peak_matmul": peak,
        "models": models,
        "targets": targets(models),
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    for line in summary_lines(result):
        print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
