"""onnxruntime's GPU execution providers on a product bundle, beside torch + CUDA graphs (issue 19, item 3).

    python -m bench.gpu_providers --bundle W/bundles/NAME --torch-graph G.pt --photos DIR --out gpu_providers.json

Run on a lent GPU machine with ``onnxruntime-gpu`` importable (it shadows the CPU build). For the
bundle that ``cvm update`` / ``cvm export`` wrote, it records:

- which providers this onnxruntime build offers and whether TensorRT's libraries load;
- parity of the product's Predictor on the CUDA provider against the CPU provider, on real photos,
  with the figures of the fp32 export gate (``deploy.export.GATES``), with TF32 on (onnxruntime's
  default) and off;
- the Memcpy nodes onnxruntime inserts for the CUDA provider (the optimised graph it saves) and the
  nodes next to them, so the operators that fall back to the CPU are named;
- latency p50/p99 and throughput at each batch size: a bare CUDA-provider session fed host arrays
  (what the server does), the same session with inputs and outputs bound on the device (IO binding),
  and the checkpoint's torch graph replayed from a CUDA graph on the same GPU, side by side.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 8, 16, 32, 64, 128, 256)


def stats(ms: Sequence[float], batch: int) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "mean_ms": round(float(a.mean()), 4),
        "images_per_s": round(batch * 1000.0 / float(a.mean()), 1),
        "calls": len(a),
    }


def timed(fn: Callable[[], Any], seconds: float, min_calls: int = 30, warmup: int = 10) -> list[float]:
    """Milliseconds of each call of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def save_torch_graph(workdir: Path, path: Path) -> None:
    """The store's serving graph as config, table and weights: a checkpoint also holds the analytic
    learner's statistics (about 33 MB for Lite0), more than a device call can carry beside the rest."""
    import torch

    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.loading import model_from_checkpoint

    ckpt = CheckpointStore(workdir).load()
    model = model_from_checkpoint(ckpt)
    torch.save(
        {
            "config": ckpt.model_config,
            "table": ckpt.table.as_float32(),
            "seen": ckpt.seen,
            "weights": model.state_dict(),
        },
        path,
    )


def load_torch_graph(path: Path) -> Any:
    import torch

    from cvm_edge.model import build_model
    from deploy.export import ExportGraph

    d = torch.load(path, weights_only=False)
    model = build_model(d["config"], d["table"])
    model.load_state_dict(d["weights"])
    return ExportGraph(model.eval(), tuple(d["seen"])).eval()


def trt_libs() -> dict[str, Any]:
    found = {}
    for lib in ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10"):
        try:
            ctypes.CDLL(lib)
            found[lib] = True
        except OSError:
            found[lib] = False
    return found


def parity(cpu: Any, gpu: Any, photos: Sequence[bytes], batch: int = 30) -> dict[str, Any]:
    """The fp32 gate's figures (deploy.export.GATES) of ``gpu`` against ``cpu`` on real photos."""
    lc, ec, lg, eg = [], [], [], []
    for i in range(0, len(photos), batch):
        px = np.stack([cpu.pixels(b) for b in photos[i : i + batch]])
        a, b = cpu.run_pixels(px), gpu.run_pixels(px)
        lc.append(a.logits)
        ec.append(a.embedding)
        lg.append(b.logits)
        eg.append(b.embedding)
    Lc, Ec, Lg, Eg = (np.concatenate(v) for v in (lc, ec, lg, eg))
    cos = (Ec * Eg).sum(1) / (np.linalg.norm(Ec, axis=1) * np.linalg.norm(Eg, axis=1))
    return {
        "images": len(photos),
        "top1_agreement": float((Lc.argmax(1) == Lg.argmax(1)).mean()),
        "max_abs_embedding_diff": float(np.abs(Ec - Eg).max()),
        "max_abs_logit_diff": float(np.abs(Lc - Lg).max()),
        "min_embedding_cosine": float(cos.min()),
    }


def memcpy_nodes(model_path: Path, ort: Any, providers: list[Any]) -> dict[str, Any]:
    """The CUDA session's optimised graph (saved by onnxruntime): its Memcpy nodes and their neighbours."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "opt.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(str(model_path), so, providers=providers)
        g = onnx.load(str(opt)).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in g.node:
        if not n.op_type.startswith("Memcpy"):
            continue
        src = [producer[i].op_type if i in producer else f"graph input {i}" for i in n.input]
        dst = [c.op_type for o in n.output for c in consumers.get(o, [])]
        out.append({"op": n.op_type, "tensor": n.input[0], "from": src, "to": dst})
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"count": len(out), "nodes": out, "optimised_graph_ops": ops}


def placement_log(model_path: Path, ort: Any, providers: list[Any], log_path: Path) -> dict[str, Any]:
    """onnxruntime's verbose session log (node placement, Memcpy insertion), kept as a file; the
    lines that name CPU-placed nodes or Memcpy are returned."""
    so = ort.SessionOptions()
    so.log_severity_level = 0
    fd = os.dup(2)
    with log_path.open("w") as f:
        os.dup2(f.fileno(), 2)
        try:
            ort.InferenceSession(str(model_path), so, providers=providers)
        finally:
            os.dup2(fd, 2)
            os.close(fd)
    lines = log_path.read_text(errors="replace").splitlines()
    keys = ("Memcpy", "CPUExecutionProvider", "assigned to", "Node placements", "node placement")
    hits = [ln[-300:] for ln in lines if any(k in ln for k in keys)]
    return {"log_lines": len(lines), "matches": hits[:80]}


def ort_latency(model_path: Path, ort: Any, providers: list[Any], size: int, seconds: float) -> dict[str, Any]:
    from deploy.predictor import PredictorOptions, session_options

    sess = ort.InferenceSession(str(model_path), session_options(PredictorOptions()), providers=providers)
    rng = np.random.default_rng(0)
    host: dict[str, Any] = {}
    bound: dict[str, Any] = {}
    for b in BATCHES:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)

        def run_host(x: np.ndarray = x) -> None:
            sess.run(None, {"input": x})

        host[str(b)] = stats(timed(run_host, seconds), b)
        xv = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        io = sess.io_binding()
        io.bind_ortvalue_input("input", xv)
        for o in sess.get_outputs():
            io.bind_output(o.name, "cuda", 0)

        def run_bound(io: Any = io) -> None:
            sess.run_with_iobinding(io)
            io.synchronize_outputs()

        bound[str(b)] = stats(timed(run_bound, seconds), b)
    return {"providers": sess.get_providers(), "host_arrays": host, "io_binding": bound}


def torch_latency(graph_path: Path, size: int, seconds: float, tf32: bool) -> dict[str, Any]:
    import torch

    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    graph = load_torch_graph(graph_path).cuda()
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, size, size, device="cuda")
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    graph(x)
            torch.cuda.current_stream().wait_stream(s)
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg):
                graph(x)

            def replay(cg: Any = cg) -> None:
                cg.replay()
                torch.cuda.synchronize()

            out[str(b)] = stats(timed(replay, seconds), b)
    return {"torch": torch.__version__, "tf32": tf32, "cuda_graph": out}


def torch_vs_ort_check(graph_path: Path, model_path: Path, ort: Any, providers: list[Any], size: int) -> dict[str, Any]:
    """The torch graph and the CUDA-provider session compute the same function (max |diff|)."""
    import torch

    graph = load_torch_graph(graph_path)
    x = np.random.default_rng(1).standard_normal((4, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        t = [v.numpy() for v in graph(torch.from_numpy(x))]
    o = ort.InferenceSession(str(model_path), providers=providers).run(None, {"input": x})
    return {"max_abs_diff_per_output": [float(np.abs(a - b).max()) for a, b in zip(t, o, strict=True)]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_providers", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--torch-graph", type=Path, required=True, help="save_torch_graph's file of the bundle's store")
    ap.add_argument("--photos", type=Path, required=True, help="a folder of JPEG photos for the parity check")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per side and batch size")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log-dir", type=Path, default=Path("."))
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from deploy.predictor import Predictor, PredictorOptions

    model = args.bundle / "model.onnx"
    cpu = Predictor(args.bundle, PredictorOptions(providers=("cpu",)))
    size = cpu.prep.image_size
    photos = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))]
    cuda = ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"})
    cuda_no_tf32 = ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": 0})
    res: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "available_providers": ort.get_available_providers(),
        "tensorrt_libs": trt_libs(),
        "bundle": args.bundle.name,
        "image_size": size,
        "python": platform.python_version(),
    }
    print(json.dumps({k: res[k] for k in ("onnxruntime", "available_providers", "tensorrt_libs")}), flush=True)
    gpu = Predictor(args.bundle, PredictorOptions(providers=("cuda",)))
    res["predictor_cuda_providers"] = gpu.providers
    res["parity_cuda_vs_cpu"] = parity(cpu, gpu, photos)
    print("parity (tf32 default)", res["parity_cuda_vs_cpu"], flush=True)
    gpu.session = ort.InferenceSession(str(model), providers=[cuda_no_tf32, "CPUExecutionProvider"])
    res["parity_cuda_no_tf32_vs_cpu"] = parity(cpu, gpu, photos)
    print("parity (tf32 off)", res["parity_cuda_no_tf32_vs_cpu"], flush=True)
    res["memcpy"] = memcpy_nodes(model, ort, [cuda, "CPUExecutionProvider"])
    print("memcpy", json.dumps(res["memcpy"]["nodes"])[:3000], flush=True)
    res["placement"] = placement_log(model, ort, [cuda, "CPUExecutionProvider"], args.log_dir / "ort_verbose.log")
    print("placement", "\n".join(res["placement"]["matches"][:40]), flush=True)
    res["torch_vs_ort_cuda"] = torch_vs_ort_check(
        args.torch_graph, model, ort, [cuda_no_tf32, "CPUExecutionProvider"], size
    )
    print("torch vs ort", res["torch_vs_ort_cuda"], flush=True)
    res["latency"] = {
        "ort_cuda_tf32": ort_latency(model, ort, [cuda, "CPUExecutionProvider"], size, args.seconds),
        "ort_cuda_fp32": ort_latency(model, ort, [cuda_no_tf32, "CPUExecutionProvider"], size, args.seconds),
        "torch_cuda_graph_tf32": torch_latency(args.torch_graph, size, args.seconds, tf32=True),
        "torch_cuda_graph_fp32": torch_latency(args.torch_graph, size, args.seconds, tf32=False),
    }
    res["command"] = " ".join(["python -m bench.gpu_providers", *sys.argv[1:]])
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for side, v in res["latency"].items():
        rows = v.get("cuda_graph") or v.get("io_binding")
        for b, s in rows.items():
            host = v.get("host_arrays", {}).get(b, {})
            print(
                f"{side:24s} b{b:>4s} p50 {s['p50_ms']:8.3f} p99 {s['p99_ms']:8.3f} ms {s['images_per_s']:9.1f} img/s"
                + (f" | host arrays p50 {host['p50_ms']:8.3f} {host['images_per_s']:9.1f} img/s" if host else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
