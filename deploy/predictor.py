"""The Predictor: one verified bundle in an onnxruntime session, plus the training-side preprocessing.

Images go through exactly the functions training used (``cvm_edge.preprocess.load_pixels`` and
``normalise``), so the server's answers match the trained model. No torch.

It owns bytes to outputs for the server too: encoded images (decoded under the server's limits,
:meth:`Predictor.images_input`) or a client's FP32 tensor (:meth:`Predictor.tensor_input`) become
the model's input here, and :meth:`Outputs.require_finite` refuses outputs that overflowed; the
routes in :mod:`deploy.server` only read requests and write answers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cvm_edge.errors import DataError, ModelLoadError, UsageError
from cvm_edge.preprocess import DEFAULT_MAX_PIXELS, Preprocessing, load_pixels, normalise
from deploy.bundle import Bundle, load_bundle
from deploy.cpu import this_cpu_int8_fit
from deploy.imagedecode import ImageDecoder

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
INPUT_NAME, LOGITS_NAME, EMBEDDING_NAME = "input", "logits", "embedding"


@dataclasses.dataclass(frozen=True)
class PredictorOptions:
    providers: tuple[str, ...] = ("cpu",)  # in order of preference; CPU is always the last resort
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 1
    # Idle intra-op threads busy-wait for the next op when True (onnxruntime's default). Off by
    # default: on a small shared CPU (the update job, the HTTP server, other processes) spinning
    # threads take cores the others need; bench/inference.py measured 2-thread p50 at about half
    # with it off under load, and no difference on 1 thread (there is no pool to spin).
    allow_spinning: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 64  # the largest batch a caller may send (TensorRT builds its profile for it)
    device_id: int = 0
    trt_cache_dir: Path | None = None  # TensorRT engine + timing cache (build once, reuse across restarts)
    trt_fp16: bool = False

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise UsageError(f"providers must be a list of {', '.join(PROVIDERS)}; got {', '.join(unknown) or 'none'}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise UsageError("thread counts must be >= 0")


def resolve_providers(
    opts: PredictorOptions, image_size: int, available: Sequence[str] | None = None
) -> list[str | tuple[str, dict[str, Any]]]:
    """The explicit onnxruntime provider list for ``opts``: the requested ones that this build has
    (with their options), then CPU. Asked-for providers that are missing are logged."""
    available = list(ort.get_available_providers() if available is None else available)
    out: list[str | tuple[str, dict[str, Any]]] = []
    for key in opts.providers:
        name = PROVIDERS[key]
        if name not in available:
            log.warning("%s requested but this onnxruntime build lacks it (has: %s)", name, ", ".join(available))
            continue
        if key == "tensorrt":
            shape = f"{INPUT_NAME}:{{}}x3x{image_size}x{image_size}"
            trt: dict[str, Any] = {
                "device_id": opts.device_id,
                "trt_fp16_enable": opts.trt_fp16,
                "trt_profile_min_shapes": shape.format(1),
                "trt_profile_opt_shapes": shape.format(1),
                "trt_profile_max_shapes": shape.format(opts.max_batch),
            }
            if opts.trt_cache_dir is not None:
                opts.trt_cache_dir.mkdir(parents=True, exist_ok=True)
                trt.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=str(opts.trt_cache_dir),
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=str(opts.trt_cache_dir),
                )
            out.append((name, trt))
        elif key == "cuda":
            # TF32 off: onnxruntime's default (on) took the Lite0 224 bundle's embeddings 1.2e-4 from the
            # CPU's on an H200, past the fp32 gate (1e-4) the bundle was published under; off, 1e-7
            # (bench/results/gpu_providers.json), at 0.82x the TF32 throughput.
            out.append((name, {"device_id": opts.device_id, "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": 0}))
    out.append(PROVIDERS["cpu"])
    return out


def session_options(opts: PredictorOptions) -> ort.SessionOptions:
    """The onnxruntime session options of a Predictor (bench/inference.py times a bare session with
    the same options): every graph optimisation (constant folding, Conv+activation fusion, the
    NCHWc layout of the CPU provider), sequential execution, the memory arena and memory-pattern
    planning (on by default: repeated same-shape runs reuse one plan), explicit thread counts."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if opts.allow_spinning else "0")
    return so


class BadInputError(DataError):
    """A tensor a client sent that cannot be this model's input (not numbers, too few or too many
    of them, the wrong shape or batch size): a malformed request, so 400 rather than 422."""

    http_status = 400


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclasses.dataclass(frozen=True)
class Outputs:
    logits: np.ndarray  # [B, K] over the learned classes, manifest order
    embedding: np.ndarray  # [B, D]

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    def require_finite(self) -> Outputs:
        """These outputs, refused when they overflowed (finite inputs near float32 max give inf/NaN
        logits): a 200 with ``null`` scores is an answer no client can use."""
        if not (np.isfinite(self.logits).all() and np.isfinite(self.embedding).all()):
            raise DataError(
                "the model's outputs are not finite (overflow) for this input; inputs this large are outside its range"
            )
        return self


class Predictor:
    """A loaded, verified bundle. Thread-safe: onnxruntime sessions allow concurrent ``run`` calls."""

    def __init__(self, bundle_dir: Path, options: PredictorOptions | None = None) -> None:
        self.options = options or PredictorOptions()
        self.bundle: Bundle = load_bundle(bundle_dir)
        self.prep: Preprocessing = self.bundle.prep
        self.classes: list[str] = self.bundle.classes
        model_bytes = self.bundle.read_verified_model()  # sha256 first; the same bytes are loaded
        so = session_options(self.options)
        providers = resolve_providers(self.options, self.prep.image_size)
        try:
            self.session = ort.InferenceSession(model_bytes, so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for broken models
            raise ModelLoadError(f"bundle {self.bundle.path.name}: onnxruntime cannot load it: {exc}") from None
        self.providers: list[str] = list(self.session.get_providers())
        wanted = PROVIDERS[self.options.providers[0]]
        if self.providers[0] != wanted:
            log.warning("running on %s instead of %s (fallback)", self.providers[0], wanted)
        self._check_signature()
        self.int8_warning = self._int8_fit()
        if self.int8_warning:
            log.warning("bundle %s: %s", self.bundle.name, self.int8_warning)

    def _int8_fit(self) -> str | None:
        """Why this int8 bundle's weights do not suit this CPU (deploy/cpu.py); None when they do,
        for other precisions, and on GPU providers (they bring their own int8 kernels)."""
        if self.bundle.precision != "int8" or self.providers[0] != PROVIDERS["cpu"]:
            return None
        return this_cpu_int8_fit(self.bundle.int8_weights)

    def _check_signature(self) -> None:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        name = self.bundle.path.name
        if INPUT_NAME not in ins or {LOGITS_NAME, EMBEDDING_NAME} - set(outs):
            raise ModelLoadError(f"bundle {name}: the model lacks the input/outputs input, logits, embedding")
        shape = ins[INPUT_NAME].shape
        size = self.prep.image_size
        if len(shape) != 4 or list(shape[1:]) != [3, size, size]:
            raise ModelLoadError(f"bundle {name}: model input {shape} does not fit the manifest's {size} px")
        width = outs[LOGITS_NAME].shape[-1]
        if isinstance(width, int) and width != len(self.classes):
            raise ModelLoadError(f"bundle {name}: {width} logits but {len(self.classes)} classes in the manifest")

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def manifest(self) -> dict[str, Any]:
        return self.bundle.manifest

    # ----- inputs ------------------------------------------------------------------------------
    def pixels(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 HWC at the model's size (413/415/422 errors on bad input)."""
        return load_pixels(data, self.prep, max_pixels=self.options.max_pixels)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        s = self.prep.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise DataError(f"input tensor must have shape [B, 3, {s}, {s}], got {list(x.shape)}")
        if not 1 <= x.shape[0] <= self.options.max_batch:
            raise DataError(f"batch size must be 1..{self.options.max_batch}, got {x.shape[0]}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def tensor_input(self, data: np.ndarray | list[Any], shape: list[int]) -> np.ndarray:
        """A client's FP32 tensor -> the model input: ``data`` as JSON numbers (flat or nested lists)
        or a float32 array already, in ``shape``. Non-numbers, an element count that is not the
        shape's, a shape or batch size the model does not take are :class:`BadInputError` (400);
        NaN or infinite values a :class:`DataError` (422)."""
        x = data if isinstance(data, np.ndarray) else _fp32_array(data)
        needed = math.prod(shape)  # exact: np.prod wraps around at 2**63 and lets a huge shape through
        if x.size != needed:
            raise BadInputError(f"FP32 data has {x.size} elements but shape {shape} needs {needed}")
        x = x.reshape(shape)
        if not np.isfinite(x).all():
            raise DataError("FP32 data holds NaN or infinite values")
        try:
            return self.check_input(x)
        except DataError as exc:  # the wrong shape from a client is a bad request, not bad data
            raise BadInputError(str(exc)) from None

    def images_input(self, images: Sequence[tuple[str | None, bytes]], decoder: ImageDecoder) -> np.ndarray:
        """Encoded images (with a name each, for errors) -> the model input, decoded under the
        limits of ``decoder`` (a server's: hostile input) by the training-side preprocessing."""
        return normalise(decoder.decode_all(images, self.prep), self.prep)

    # ----- inference -----------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> Outputs:
        """Normalised float32 NCHW -> logits and embeddings."""
        logits, emb = self.session.run([LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: self.check_input(x)})
        return Outputs(np.asarray(logits, np.float32), np.asarray(emb, np.float32))

    def run_pixels(self, pixels: np.ndarray) -> Outputs:
        return self.run(normalise(pixels, self.prep))

    def run_images(self, images: Sequence[bytes]) -> Outputs:
        """Decode each image once, then one session call for the whole batch."""
        if len(images) == 1:
            return self.run_pixels(self.pixels(images[0])[None])
        return self.run_pixels(np.stack([self.pixels(b) for b in images]))

    def top_k(self, outputs: Outputs, k: int) -> list[list[dict[str, Any]]]:
        probs = outputs.probabilities
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            [{"label": self.classes[i], "score": round(float(p[i]), 6)} for i in row]
            for row, p in zip(order, probs, strict=True)
        ]

    def labels(self, outputs: Outputs) -> list[str]:
        """The class of each row: the largest logit's."""
        return [self.classes[int(i)] for i in outputs.logits.argmax(1)]

    def classify(self, images: Sequence[bytes], k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-``k`` labels and softmax scores (over the learned classes) for each encoded image."""
        return self.top_k(self.run_images(images), k)

    def warmup(self) -> None:
        """One inference on a grey frame, so the first real request does not pay for lazy init."""
        s = self.prep.image_size
        self.run_pixels(np.full((1, s, s, 3), 128, np.uint8))


def _fp32_array(data: list[Any]) -> np.ndarray:
    """JSON numbers (flat or nested lists) as float32; strings, booleans, nulls, objects, ragged
    lists and integers beyond float range are refused (400), not coerced or crashed on."""
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise BadInputError("FP32 data must be numbers in flat or evenly nested lists") from None
    if raw.dtype.kind not in "iuf":  # object (ragged, huge ints, nulls), str, bool
        raise BadInputError("FP32 data must be numbers in flat or evenly nested lists")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused as NaN/inf
        return raw.astype(np.float32)
