"""CLI subcommands of the deployment side (`cvm export`, `cvm serve`), registered by cvm_edge.cli.

Importing this module stays torch-free: heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cvm_edge.argtypes import experimental_group, int_at_least, mark_experimental
from deploy.cpu import INT8_WEIGHTS

DEFAULT_OPSET = 18  # deploy.export.DEFAULT_OPSET (that module imports torch)
DEFAULT_PORT = 8080
PROVIDERS = ("tensorrt", "cuda", "cpu")  # the keys of deploy.predictor.PROVIDERS (that module loads onnxruntime)


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0")
    return v


def _positive_float(text: str) -> float:
    v = _non_negative_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return v


def _at_least_one(text: str) -> float:
    v = _non_negative_float(text)
    if not 1 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _providers(text: str) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in PROVIDERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"providers are a comma list of {', '.join(PROVIDERS)}; got {text!r}")
    return names


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from cvm_edge.checkpoints import parse_version
        from deploy.export import ExportOptions, export_locked
    except ModuleNotFoundError as exc:  # a serve-only install (the Docker `serve` image) has no torch
        from cvm_edge.errors import CvmError

        raise CvmError(f"`cvm export` needs the [train] extra; {exc.name!r} is not installed here") from None
    from cvm_edge.errors import UsageError

    triton, triton_out = None, None
    if args.format == "triton":
        if args.out is None:
            raise UsageError("--format triton needs --out DIR (the Triton model repository)")
        from deploy.triton import TritonOptions

        triton = TritonOptions(max_batch_size=args.max_batch_size, max_queue_delay_us=args.queue_delay_us)
        triton_out = Path(args.out)
    elif args.out is not None:
        raise UsageError("--out is for --format triton; a bundle is published under <workdir>/bundles/")
    opts = ExportOptions(
        precision=args.precision,
        opset=args.opset,
        calibration=args.calibration,
        int8_weights=args.int8_weights,
        routing=args.routing,
        top_k=args.top_k,
    )
    version = parse_version(args.version) if args.version is not None else None
    result = export_locked(args.workdir, version, opts, images_dir=args.images)
    print(result.summary())
    if triton is not None and triton_out is not None:
        from deploy.triton import write_repository

        model_dir = write_repository(result.path, triton_out, triton)
        print(f"wrote Triton model {triton.model_name!r} from bundle {result.name} to {model_dir}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.predictor import PredictorOptions
    from deploy.server import ADMIN_TOKEN_ENV, ServerSettings, serve

    settings = ServerSettings(
        workdir=args.workdir,
        bundle=args.bundle,
        host=args.host,
        port=args.port,
        predictor=PredictorOptions(
            providers=args.providers,
            intra_op_threads=args.threads,
            max_pixels=args.max_pixels,
            max_batch=args.max_batch,
            trt_cache_dir=args.trt_cache,
            trt_fp16=args.trt_fp16,
        ),
        poll_interval_s=args.poll_interval,
        max_body_bytes=args.max_body_bytes,
        max_files=args.max_files,
        model_name=args.model_name,
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
        access_log=not args.no_access_log,
        max_request_pixels=args.max_request_pixels,
        max_aspect_ratio=args.max_aspect_ratio,
        decode_memory_bytes=args.decode_memory_mb << 20,
        worker_threads=args.worker_threads,
        request_timeout_s=args.request_timeout,
        max_connections=args.max_connections,
        batch_window_ms=args.batch_window_ms,
        batch_max_images=args.batch_max_images,
        batch_queue_images=args.batch_queue_images,
        batch_runners=args.batch_runners,
        http_parser=args.http,
        event_loop=args.loop,
    )
    serve(settings)
    return 0


def add_deploy_commands(sub: Any) -> None:
    """Register the deployment subcommands on the ``cvm`` subparser collection."""
    e = sub.add_parser(
        "export",
        help="export a checkpoint to an ONNX bundle, check parity against torch, publish it",
        description="Writes <workdir>/bundles/<name>/ (model.onnx, concepts.npz, manifest.json) and moves "
        "<workdir>/bundles/CURRENT to it, only when the parity gate of the precision passes. "
        "--format triton then writes that bundle as OUT/cvm/{config.pbtxt,labels.txt,manifest.json,1/model.onnx}.",
    )
    e.add_argument("--workdir", type=Path, required=True, help="store directory")
    e.add_argument("--version", default=None, help="checkpoint version (default: the latest)")
    e.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    e.add_argument("--opset", type=int_at_least(17), default=DEFAULT_OPSET, help="ONNX opset, 17 or newer")
    e.add_argument(
        "--calibration",
        choices=("percentile", "minmax", "entropy"),
        default="percentile",
        help="int8: how activation ranges are chosen on the replay buffer (default percentile)",
    )
    e.add_argument(
        "--int8-weights",
        choices=INT8_WEIGHTS,
        default="auto",
        help="int8: weights as int8 (U8S8: fast and exact on ARM and on x86 with VNNI) or uint8 (U8U8: exact on "
        "x86 without VNNI, where U8S8 saturates); auto picks for this CPU (default auto)",
    )
    e.add_argument(
        "--images",
        type=Path,
        default=None,
        help="labelled images (class folders or labels.csv) to check parity and calibrate int8 on, for stores that "
        "keep none (the analytic learner)",
    )
    e.add_argument(
        "--format",
        choices=("bundle", "triton"),
        default="bundle",
        help="triton: also write the published bundle as a Triton model repository OUT/cvm/ (default bundle)",
    )
    e.add_argument("--out", type=Path, default=None, help="--format triton: the model repository folder")
    e.add_argument("--max-batch-size", type=int_at_least(1), default=64, help="--format triton: max_batch_size")
    e.add_argument(
        "--queue-delay-us",
        type=int_at_least(0),
        default=1000,
        help="--format triton: dynamic batching max_queue_delay_microseconds (default 1000)",
    )
    lab = experimental_group(e)
    lab.add_argument(
        "--fusion-routing",
        dest="routing",
        choices=("none", "top-k"),
        default="none",
        help="top-k: export the fused task models of a store trained with --plugins fusion, routed by "
        "prototype similarity inside the graph (fp32); none: the single model (default)",
    )
    lab.add_argument("--top-k", type=int_at_least(1), default=2, help="task models averaged per image (fusion routing)")
    mark_experimental(e, lab)
    e.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP (FastAPI/uvicorn), following CURRENT",
        description="Serves /v1/classify, the Open Inference Protocol v2 subset, /v1/model and /metrics. "
        "POST /v1/admin/reload needs the bearer token in $CVM_ADMIN_TOKEN (disabled when unset).",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", type=Path, help="store directory: serve bundles/CURRENT and hot-reload it")
    src.add_argument("--bundle", type=Path, help="one bundle directory (no polling)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int_at_least(0), default=DEFAULT_PORT)
    s.add_argument("--threads", type=int_at_least(0), default=0, help="onnxruntime intra-op threads (0: default)")
    s.add_argument(
        "--providers",
        type=_providers,
        default=("cpu",),
        help="execution providers in order of preference: tensorrt,cuda,cpu (missing ones fall back, logged)",
    )
    s.add_argument("--poll-interval", type=_non_negative_float, default=1.0, help="seconds between CURRENT checks")
    s.add_argument("--max-body-bytes", type=int_at_least(1), default=10 << 20, help="request body limit")
    s.add_argument("--max-pixels", type=int_at_least(1), default=40_000_000, help="decoded image pixel limit")
    s.add_argument("--max-files", type=int_at_least(1), default=32, help="files per multipart request")
    s.add_argument("--max-batch", type=int_at_least(1), default=64, help="images per inference request")
    s.add_argument(
        "--max-request-pixels",
        type=int_at_least(1),
        default=120_000_000,
        help="declared pixels of all images of a request",
    )
    s.add_argument(
        "--max-aspect-ratio", type=_at_least_one, default=100.0, help="longest / shortest image side (default 100)"
    )
    s.add_argument(
        "--decode-memory-mb",
        type=int_at_least(1),
        default=320,
        help="estimated memory of all images being decoded at once; a larger image is refused (413)",
    )
    s.add_argument(
        "--worker-threads", type=int_at_least(0), default=0, help="decode + inference threads (0: min(8, 2 x CPUs))"
    )
    s.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a client has to send its request headers, and then its body (408 after)",
    )
    s.add_argument(
        "--max-connections",
        type=int_at_least(1),
        default=512,
        help="open connections; more are closed at once (keep it under the open-file limit)",
    )
    s.add_argument(
        "--batch-window-ms",
        type=_non_negative_float,
        default=0.0,
        help="dynamic batching of /v1/classify: ms a batch waits for requests still being decoded "
        "(a lone request never waits); 0, the default, turns it off: on a 2-core CPU it gained no throughput "
        "(bench/BENCHMARKS.md); try 2 with a GPU provider or many cores",
    )
    s.add_argument(
        "--batch-max-images", type=int_at_least(1), default=16, help="images per batched model run (default 16)"
    )
    s.add_argument(
        "--batch-queue-images",
        type=int_at_least(1),
        default=256,
        help="images admitted for batching and not yet answered; more are refused with 503 (default 256)",
    )
    s.add_argument(
        "--batch-runners",
        type=int_at_least(0),
        default=0,
        help="batches run at once (0: CPUs / --threads, at most worker threads - 1)",
    )
    s.add_argument(
        "--http",
        choices=("auto", "httptools", "h11"),
        default="auto",
        help="HTTP parser (auto: httptools if installed)",
    )
    s.add_argument(
        "--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="event loop (auto: uvloop if installed)"
    )
    s.add_argument("--model-name", default="cvm", help="model name in the v2 endpoints")
    s.add_argument("--trt-cache", type=Path, default=None, help="TensorRT engine/timing cache directory")
    s.add_argument("--trt-fp16", action="store_true", help="let TensorRT build fp16 kernels")
    s.add_argument("--no-access-log", action="store_true", help="no per-request log lines")
    s.set_defaults(func=cmd_serve)
