"""``cvm export``: a checkpoint becomes an ONNX bundle, checked against torch before it is published.

The exported graph takes the normalised float32 NCHW input (dynamic batch) and returns
``logits`` over the learned classes only, in ``ckpt.seen`` order, and the ``embedding``.
Parity is measured on the checkpoint's own real images (held-out ``val`` plus the replay buffer);
a precision whose figures miss its gate is refused with the figure named, and nothing is
published. This module is the torch side; serving never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import io
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cvm_edge.backbone_graph import GRAPH_OPSET
from cvm_edge.backbone_graph import OUTPUT_NAME as BACKBONE_OUTPUT
from cvm_edge.checkpoints import Checkpoint, CheckpointStore
from cvm_edge.data import ImageSet
from cvm_edge.errors import CvmError, UsageError
from cvm_edge.frozen_features import GraphFeatures
from cvm_edge.fsutil import FileLock, clean_stale_tmp, scratch_dir
from cvm_edge.lab.fusion_state import FusionState
from cvm_edge.lab.routing import FusedRoutedModel
from cvm_edge.loading import graph_to_run, head_from_checkpoint, model_from_checkpoint
from cvm_edge.memory import release_freed_memory
from cvm_edge.model import MAX_LOGIT_SCALE, CvmModel
from cvm_edge.preprocess import Preprocessing, normalise
from cvm_edge.strategy import eval_batch_for
from deploy.bundle import (
    CONCEPTS_FILE,
    FORMAT,
    MODEL_FILE,
    PRECISIONS,
    bundles_root,
    next_bundle_name,
    publish_bundle,
    sha256_bytes,
)
from deploy.cpu import INT8_WEIGHTS, resolve_int8_weights

log = logging.getLogger(__name__)

MIN_OPSET = 17
DEFAULT_OPSET = 18
MIN_PARITY_IMAGES = 64
CALIBRATION_METHODS = ("percentile", "minmax", "entropy")
ROUTINGS = ("none", "top-k")
EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME, LOGITS_NAME, EMBEDDING_NAME = "input", "logits", "embedding"
# The gates of issue 3; a bundle is published only when every figure of its precision passes.
GATES: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_embedding_diff": 1e-4, "top1_agreement": 1.0},
    "fp16": {"min_embedding_cosine": 0.999, "top1_agreement": 0.995},
    "int8": {"top1_agreement": 0.97, "val_accuracy_drop_points": 1.0},
}


class ExportGateError(CvmError):
    """The exported model does not match torch closely enough; nothing was published."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    calibration: str = "percentile"  # int8 only: how activation ranges are chosen from the buffer
    # int8 only: "int8" (U8S8), "uint8" (U8U8) or "auto", the fast exact kind for this CPU (deploy/cpu.py)
    int8_weights: str = "auto"
    min_parity_images: int = MIN_PARITY_IMAGES
    # Parity batches; None: :func:`parity_batch` (1 at 224 px).
    batch_size: int | None = None
    # "top-k": a store trained with the fusion plugin exports its routed task models
    # (cvm_edge.lab.routing.FusedRoutedModel) instead of the single unified model.
    routing: str = "none"
    top_k: int = 2
    # Which torch exporter writes the graph at opset 18 and newer (opset 17 is always TorchScript):
    # "dynamo" (torch.export-based, torch's default) or "torchscript". `cvm update`'s own export takes
    # TorchScript: measured on 2 cores with Lite0 at 224 px, 1.0 s of CPU and ~+120 MB of peak RSS
    # against 8.3 s and ~+230 MB; both graphs pass the same parity gates.
    exporter: str = "dynamo"

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise UsageError(f"exporter must be one of {', '.join(EXPORTERS)}, not {self.exporter!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.opset < MIN_OPSET:
            raise UsageError(f"opset must be {MIN_OPSET} or newer, not {self.opset}")
        if self.calibration not in CALIBRATION_METHODS:
            raise UsageError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}")
        if self.int8_weights not in INT8_WEIGHTS:
            raise UsageError(f"int8 weights must be one of {', '.join(INT8_WEIGHTS)}, not {self.int8_weights!r}")
        if self.routing not in ROUTINGS:
            raise UsageError(f"routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}")
        if self.top_k < 1:
            raise UsageError(f"top-k must be at least 1, not {self.top_k}")
        if self.routing != "none" and self.precision != "fp32":
            # int8 calibration leaves the head in float by finding it downstream of the embedding,
            # which the routed graph computes last; fp32 is the precision whose gate was checked.
            raise UsageError("routed models export in fp32 only")


# What a device's own exports use (`cvm update`'s publish, a fleet device's publish): TorchScript, as
# the comment on ExportOptions.exporter says, since a device's update peaks at its export.
ON_DEVICE = ExportOptions(exporter="torchscript")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    name: str
    path: Path
    manifest: dict[str, Any]

    def summary(self) -> str:
        m = self.manifest
        p = m["parity"]
        figures = ", ".join(f"{k} {_fmt(p[k])}" for k in GATES[m["precision"]])
        return (
            f"published bundle {self.name} ({m['precision']}, opset {m['opset']}, {len(m['classes'])} classes): "
            f"{figures} on {p['n_images']} images"
        )


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.4f}"


def parity_batch(image_size: int) -> int:
    """Images per parity batch: 1 at 224 px, 16 at 56 px (a sixteenth of training's inference batch).
    Measured on 2 CPU cores with Lite0 at 224 px: torch's and onnxruntime's activations of batch 16
    raised the export's peak RSS by ~400 MB, of batch 4 by ~170 MB, of batch 1 by ~100 MB; one image
    a call costs torch ~50 % more time per image (~0.4 s over an update's 64 parity images)."""
    return max(1, eval_batch_for(image_size) // 16)


class ExportGraph(nn.Module):
    """The serving graph: logits over the learned classes only (``seen`` order) and the embedding,
    of one model or of fused task models with their routing inside the graph."""

    def __init__(self, model: CvmModel | FusedRoutedModel, seen: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.seen: torch.Tensor
        self.register_buffer("seen", torch.tensor(seen, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, z = self.model.logits_and_embedding(x)
        return logits.index_select(1, self.seen), z


def routed_model(ckpt: Checkpoint, model: CvmModel, opts: ExportOptions) -> tuple[FusedRoutedModel, dict[str, Any]]:
    """The checkpoint's fused task models with top-k routing, and the manifest's ``routing`` entry."""
    raw = ckpt.plugin_state.get("fusion")
    if not raw:
        raise UsageError(
            f"version {ckpt.version} holds no fused task models to route; train it with `cvm update --plugins fusion`"
        )
    state = FusionState.from_tensors(raw)
    routed = FusedRoutedModel(model, state, opts.top_k).eval()
    names = ckpt.table.names
    info = {
        "kind": "top-k",
        "k": routed.k,
        "tasks": routed.n_tasks,
        "task_classes": [[names[c] for c in cs] for cs in state.task_classes],
        "features": "base backbone, cosine to centred per-task prototypes",
        "combine": routed.combine,
        "fusion_bytes": state.nbytes().to_dict(),
    }
    return routed, info


# ----- images -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParityImages:
    pixels: np.ndarray  # uint8 NHWC at the model's size
    labels: np.ndarray  # table rows of the first len(labels) rows (held-out images), the rest unknown
    info: dict[str, Any]

    @property
    def n_val(self) -> int:
        return len(self.labels)


# An analytic store keeps no images: its parity check and int8 calibration use images handed in
# (the update's own, or `cvm export --images DIR`), at most this many.
MAX_GIVEN_IMAGES = 256


def parity_images(ckpt: Checkpoint, minimum: int, given: ImageSet | None = None) -> ParityImages:
    """The checkpoint's real images (held-out val first, then the replay buffer), or ``given`` for a
    store that keeps none; when there are fewer than ``minimum``, flipped and rotated copies make up
    the count (recorded in ``info``)."""
    if len(ckpt.val) + len(ckpt.buffer) == 0 and given is not None and len(given):
        keep = np.random.default_rng(0).permutation(len(given))[:MAX_GIVEN_IMAGES]
        given = given.subset(np.sort(keep))
        base, labels = given.pixels, given.labels
        info: dict[str, Any] = {"given": len(given), "augmented": 0}
    else:
        base, labels = np.concatenate([ckpt.val.pixels, ckpt.buffer.pixels]), ckpt.val.labels
        info = {"val": len(ckpt.val), "buffer": len(ckpt.buffer), "augmented": 0}
    if len(base) == 0:
        hint = (
            "an analytic store keeps no images: pass `--images DIR` (a folder of labelled images)"
            if ckpt.model_config.analytic
            else "run `cvm update` first"
        )
        raise UsageError(f"the checkpoint holds no images to check parity on; {hint}")
    pixels = base
    variants = (
        ("horizontal flip", lambda a: a[:, :, ::-1]),
        ("vertical flip", lambda a: a[:, ::-1, :]),
        ("rotation by 90 degrees", lambda a: np.rot90(a, 1, axes=(1, 2))),
        ("rotation by 180 degrees", lambda a: np.rot90(a, 2, axes=(1, 2))),
    )
    used = []
    for label, fn in variants:
        if len(pixels) >= minimum:
            break
        pixels = np.concatenate([pixels, np.ascontiguousarray(fn(base))])
        used.append(label)
    while len(pixels) < minimum:  # a very small store: repeat what we have
        pixels = np.concatenate([pixels, pixels])
        used.append("repetition")
    if used:
        info["augmented"] = len(pixels) - len(base)
        info["note"] = f"only {len(base)} stored images; {info['augmented']} more made by {', '.join(used)} of them"
    return ParityImages(np.ascontiguousarray(pixels), np.asarray(labels, np.int64), info)


class Inputs(Protocol):
    """Model inputs that can be sliced into batches: an array, or :class:`LazyNormalised`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class LazyNormalised:
    """uint8 images normalised one batch at a time: 900 parity images at 224 px would take
    ~550 MB as one float32 array, more than the rest of an update on a device."""

    pixels: np.ndarray
    prep: Preprocessing

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: slice) -> np.ndarray:
        return normalise(self.pixels[index], self.prep)


def _batches(x: Inputs, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def torch_outputs(graph: ExportGraph, x: Inputs, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    logits, emb = [], []
    with torch.inference_mode():
        for b in _batches(x, batch_size):
            lo, z = graph(torch.from_numpy(b))
            logits.append(lo.float().numpy())
            emb.append(z.float().numpy())
    return np.concatenate(logits), np.concatenate(emb)


def onnx_outputs(model_bytes: bytes, x: Inputs, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    so = ort.SessionOptions()
    # No memory arena: a one-off pass over the parity images; the arena kept ~80 MB more at the peak
    # of a device's update (Lite0, 224 px, batch 4). Graph optimisations stay as when serving.
    so.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    logits, emb = [], []
    for b in _batches(x, batch_size):
        lo, z = sess.run([LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: b})
        logits.append(np.asarray(lo, np.float32))
        emb.append(np.asarray(z, np.float32))
    return np.concatenate(logits), np.concatenate(emb)


# ----- export ------------------------------------------------------------------------------------
def image_example(image_size: int) -> torch.Tensor:
    """An input of the whole model's shape for the exporter: two images of ``image_size``."""
    return torch.zeros(2, 3, image_size, image_size)


def export_fp32(
    graph: ExportGraph, example: torch.Tensor, opset: int, work: Path, exporter: str = "dynamo"
) -> tuple[bytes, str]:
    """ONNX bytes of ``graph`` with a dynamic batch axis, and a description of the exporter used.
    ``example`` is an input of the graph's shape (:func:`image_example`, or a head's features).

    Opset 18 and newer use torch's torch.export-based exporter unless ``exporter`` is
    ``"torchscript"``; it cannot produce opset 17, so that one goes through the TorchScript exporter."""
    path = work / "fp32.onnx"
    names = {"input_names": [INPUT_NAME], "output_names": [LOGITS_NAME, EMBEDDING_NAME]}
    with warnings.catch_warnings(), quiet_stdout():
        warnings.simplefilter("ignore")
        if opset >= 18 and exporter == "dynamo":
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
                **names,  # type: ignore[arg-type]
            )
            exporter = f"torch.onnx dynamo (torch {torch.__version__})"
        else:
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                opset_version=opset,
                dynamo=False,
                dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, LOGITS_NAME, EMBEDDING_NAME)},
                **names,  # type: ignore[arg-type]
            )
            exporter = f"torch.onnx torchscript (torch {torch.__version__})"
    model = onnx.load(str(path))
    got = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise CvmError(f"asked for opset {opset} but the exporter wrote opset {got}")
    _name_batch_axis((*model.graph.input, *model.graph.output))
    data = bytes(model.SerializeToString())
    del model
    onnx.checker.check_model(data)  # the bytes: checking the proto would serialise another copy
    return data, exporter


def compose_backbone(backbone: bytes, head: bytes, opset: int) -> bytes:
    """One graph of the store's backbone graph (``input`` -> ``features``) and an exported head
    (features as its ``input`` -> ``logits``, ``embedding``), converted to ``opset``: the bundle of
    a store that keeps its backbone graph, made without a timm module.

    Composed on the wire: protobuf parses two concatenated messages as the first merged with the
    second (repeated fields appended). So the backbone without its outputs, followed by a model that
    holds only the head's renamed nodes, weights and outputs, is the composed model. Composing the
    protos (``onnx.compose.merge_models``) held both models, their merge and serialised copies at
    once: with the analytic head's projection (21 MB at M = 4,096) that was the peak of a whole
    ``cvm update``."""
    b = onnx.load_from_string(backbone)
    h = onnx.load_from_string(head)
    if (
        h.graph.sparse_initializer
        or h.functions
        or any(a.HasField("g") or a.graphs for n in h.graph.node for a in n.attribute)
    ):
        raise CvmError(
            "the exported head has subgraphs, functions or sparse weights, which the composition does not handle"
        )
    versions = {imp.domain: imp.version for imp in b.opset_import}
    for imp in h.opset_import:
        versions[imp.domain] = max(versions.get(imp.domain, 0), imp.version)
    # The backbone part: every field of the model but the graph's outputs (the head's replace them).
    b.ir_version = max(b.ir_version, h.ir_version)  # both exporters write standard ONNX: the newer reads both
    del b.opset_import[:]
    b.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    del b.graph.output[:]
    _name_batch_axis(b.graph.input)
    # The head part: only what is appended to the backbone's graph; a singular field set here would
    # overwrite the backbone's (last one wins), a repeated one be listed twice.
    kept = (LOGITS_NAME, EMBEDDING_NAME)

    def renamed(name: str) -> str:
        """The head's tensor names inside the composed graph: its input is the backbone's output, its
        outputs keep their names, everything else gets a prefix (no clash with the backbone's)."""
        if not name or name in kept:
            return name
        return BACKBONE_OUTPUT if name == INPUT_NAME else "head/" + name

    for node in h.graph.node:
        node.name = "head/" + node.name if node.name else ""
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
    for tensor in (*h.graph.initializer, *h.graph.value_info):
        tensor.name = renamed(tensor.name)
    _name_batch_axis(h.graph.output)
    for field in [f.name for f, _ in h.ListFields() if f.name != "graph"]:
        h.ClearField(field)
    for field in [
        f.name for f, _ in h.graph.ListFields() if f.name not in ("node", "initializer", "value_info", "output")
    ]:
        h.graph.ClearField(field)
    data = b.SerializeToString() + h.SerializeToString()
    del b, h
    if opset != GRAPH_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(onnx.load_from_string(data), opset)
        data = model.SerializeToString()
        del model
    onnx.checker.check_model(data)  # the bytes: checking a proto would serialise another copy
    return bytes(data)


def _name_batch_axis(values: Iterable[onnx.ValueInfoProto]) -> None:
    for value in values:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise CvmError(f"exported {value.name!r} has a fixed batch axis")
        dim.dim_param = "batch"


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Keep the exporter's and quantiser's progress prints off stdout (the CLI prints one summary line)."""
    with contextlib.redirect_stdout(sys.stderr if log.isEnabledFor(logging.DEBUG) else io.StringIO()):
        yield


def to_fp16(fp32: bytes) -> bytes:
    """Weights and activations in float16; the input and outputs stay float32 so callers do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load_from_string(fp32), keep_io_types=True)
    return bytes(model.SerializeToString())


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that compute the logits from the embedding (they stay float: cosine ties are decided there)."""
    downstream, names = {EMBEDDING_NAME}, []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(i in downstream for i in node.input):
            downstream.update(node.output)
            if node.name:
                names.append(node.name)
    return names


def to_int8(fp32: bytes, calibration: Inputs, method: str, work: Path, weights: str = "auto") -> bytes:
    """Static QDQ quantisation (uint8 activations, per-channel ``weights``: "int8" for U8S8, "uint8"
    for U8U8, "auto" this CPU's fast exact kind, see deploy/cpu.py) calibrated on ``calibration``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    weights = resolve_int8_weights(weights)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:  # one image at a time: the histogram calibrators need equal shapes
            self._it = iter(_batches(calibration, 1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self._it, None)
            return None if b is None else {INPUT_NAME: b}

    src, pre, out = work / "fp32.onnx", work / "pre.onnx", work / "int8.onnx"
    src.write_bytes(fp32)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    methods = {
        "percentile": CalibrationMethod.Percentile,
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
    }
    with quiet_stdout():
        try:
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                # U8S8 saturates on x86 CPUs without VNNI, U8U8 is four times slower than fp32 on
                # those with it (deploy/cpu.py): the caller picks for the CPU that will serve.
                weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8,
                calibrate_method=methods[method],
                nodes_to_exclude=_head_nodes(onnx.load(str(pre))),
            )
        except ValueError as exc:
            if "bins" not in str(exc):
                raise
            # numpy cannot histogram an activation whose range is denormal-small (seen on random-init
            # GhostNet, LCNet and EfficientViT); minmax calibration builds no histogram.
            raise ExportGateError(
                f"int8 calibration by {method} failed: an activation's range on the calibration images is too "
                f"small to histogram ({exc}); `--calibration minmax` needs no histogram; nothing was published"
            ) from None
    return out.read_bytes()


# ----- parity ------------------------------------------------------------------------------------
def parity_figures(
    ref: tuple[np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray],
    val_labels: np.ndarray,
) -> dict[str, Any]:
    """How closely the ONNX outputs ``got`` follow torch's ``ref`` on the same inputs.

    ``val_labels`` are class indices (``seen`` order) of the first ``len(val_labels)`` images."""
    (ref_lo, ref_z), (lo, z) = ref, got
    cos = (ref_z * z).sum(1) / np.maximum(np.linalg.norm(ref_z, axis=1) * np.linalg.norm(z, axis=1), 1e-12)
    n_val = len(val_labels)
    acc_ref = float((ref_lo[:n_val].argmax(1) == val_labels).mean()) if n_val else None
    acc = float((lo[:n_val].argmax(1) == val_labels).mean()) if n_val else None
    return {
        "n_images": len(ref_lo),
        "max_abs_embedding_diff": float(np.abs(ref_z - z).max()),
        "max_abs_logit_diff": float(np.abs(ref_lo - lo).max()),
        "min_embedding_cosine": float(cos.min()),
        "mean_embedding_cosine": float(cos.mean()),
        "top1_agreement": float((ref_lo.argmax(1) == lo.argmax(1)).mean()),
        "n_val": n_val,
        "val_accuracy_torch": acc_ref,
        "val_accuracy_onnx": acc,
        "val_accuracy_drop_points": None if acc is None or acc_ref is None else 100.0 * (acc_ref - acc),
    }


def check_gates(precision: str, figures: dict[str, Any], min_images: int) -> None:
    if figures["n_images"] < min_images:
        raise ExportGateError(f"parity needs at least {min_images} images, had {figures['n_images']}")
    for key, limit in GATES[precision].items():
        value = figures[key]
        if value is None:
            raise ExportGateError(f"{precision} parity gate: {key} cannot be measured (no held-out images)")
        lower_is_better = key.startswith("max_") or key.endswith("_drop_points")
        ok = value <= limit if lower_is_better else value >= limit
        if not ok:
            op = "<=" if lower_is_better else ">="
            raise ExportGateError(
                f"{precision} parity gate failed: {key} = {value:.6g}, needs {op} {limit:g} "
                f"(on {figures['n_images']} images, {figures['n_val']} held-out); nothing was published"
            )


# ----- the whole job -----------------------------------------------------------------------------
def build_manifest(
    ckpt: Checkpoint,
    name: str,
    opts: ExportOptions,
    model_bytes: bytes,
    exporter: str,
    parity: dict[str, Any],
    routing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    prep = ckpt.prep
    head = ckpt.model_config.head
    scale = None
    if head == "concepts":
        raw = float(ckpt.weights["head.logit_scale"])
        scale = float(np.exp(min(raw, MAX_LOGIT_SCALE)))
    emb_dim = ckpt.table.dim if head == "concepts" else None
    if ckpt.model_config.analytic and ckpt.model_config.analytic_targets == "onehot":
        emb_dim = len(ckpt.table.names)  # the raw one-hot ridge scores over every table row
    return {
        "format": FORMAT,
        "name": name,
        "version": ckpt.version,
        "checkpoint_created_at": ckpt.created_at,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "precision": opts.precision,
        "opset": opts.opset,
        "exporter": exporter,
        "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, prep.image_size, prep.image_size]},
        "outputs": [
            {"name": LOGITS_NAME, "datatype": "FP32", "shape": [-1, len(ckpt.seen)]},
            {"name": EMBEDDING_NAME, "datatype": "FP32", "shape": [-1, emb_dim if emb_dim else -1]},
        ],
        "image_size": prep.image_size,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "crop_pct": prep.crop_pct,
        "preprocessing": prep.to_dict(),
        "head": head,
        "logit_scale": scale,
        "classes": ckpt.seen_names,
        "class_rows": list(ckpt.seen),
        "table_fingerprint": ckpt.table.fingerprint,
        "table_encoder": ckpt.table.encoder_id,
        "model": ckpt.model_config.to_dict(),
        "model_sha256": sha256_bytes(model_bytes),
        "model_bytes": len(model_bytes),
        "parity": parity,
        **({"routing": routing} if routing else {}),
        **experts_manifest(ckpt),
        **unknown_manifest(ckpt),
    }


def unknown_manifest(ckpt: Checkpoint) -> dict[str, Any]:
    """``{"unknown": {...}}`` for an analytic store: the threshold on the best class score
    (max logit / logit_scale) under which an image is of no learned class; else nothing."""
    threshold = ckpt.history[-1].get("unknown_threshold") if ckpt.history else None
    if threshold is None:
        return {}
    return {"unknown": {"threshold": float(threshold), "score": "max over classes of logits / logit_scale"}}


def experts_manifest(ckpt: Checkpoint) -> dict[str, Any]:
    """``{"experts": {...}}`` for a model with per-task experts (their routing runs inside
    ``model.onnx``; this records what it is), else nothing: other manifests stay as they were."""
    cfg = ckpt.model_config
    if cfg.experts == "none":
        return {}
    prefix = "head.experts."
    tensors = [v for k, v in ckpt.weights.items() if k.startswith(prefix)]
    return {
        "experts": {
            "kind": cfg.experts,
            "count": int(ckpt.weights[prefix + "anchor_means"].shape[0]),
            "rank": cfg.expert_rank,
            "routing": cfg.routing,
            "routing_temperature": cfg.routing_temperature,
            "shared_mapper": cfg.expert_shared_mapper,
            "bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
        }
    }


def export_bundle(
    workdir: Path, version: int | None = None, opts: ExportOptions | None = None, images: ImageSet | None = None
) -> ExportResult:
    """Export a checkpoint (default: the latest), check parity, publish the bundle and move CURRENT.

    The caller holds the store lock (``cvm export`` takes it; ``cvm update`` calls this from its
    publish hook, inside its own lock)."""
    opts = opts or ExportOptions()
    ckpt = CheckpointStore(workdir).load(version, ridge_statistics=False)
    if not ckpt.seen:
        raise UsageError(f"version {ckpt.version} has not learned any class yet; run `cvm update` first")
    root = bundles_root(workdir)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root)
    # A store that keeps its backbone graph (a TorchScript export, cvm_edge.backbone_graph) exports
    # without a timm module where the TorchScript exporter is asked for (a device's own export,
    # ON_DEVICE): the head is exported alone and composed with the graph, and the reference is torch's
    # head on the graph's features. Other exporters, and opsets below the graph's (onnx cannot
    # down-convert every operator), export the whole model through the timm module as before.
    composable = opts.routing == "none" and opts.exporter == "torchscript" and opts.opset >= GRAPH_OPSET
    backbone = graph_to_run(ckpt) if composable else None
    model = head_from_checkpoint(ckpt) if backbone is not None else model_from_checkpoint(ckpt)
    routing = None
    if opts.routing == "none":
        graph = ExportGraph(model, ckpt.seen).eval()
    else:
        routed, routing = routed_model(ckpt, model, opts)
        graph = ExportGraph(routed, ckpt.seen).eval()
    parity = parity_images(ckpt, opts.min_parity_images, images)
    x = LazyNormalised(parity.pixels, ckpt.prep)
    batch = opts.batch_size or parity_batch(ckpt.prep.image_size)
    features = None
    if backbone is not None:
        features = GraphFeatures(backbone, ckpt.prep)(parity.pixels)
        ref = torch_outputs(graph, features, len(features))
    else:
        ref = torch_outputs(graph, x, batch)
    release_freed_memory()  # torch's activations: the exporter's peak must not stack on them
    seen_index = {c: i for i, c in enumerate(ckpt.seen)}
    val_labels = np.asarray([seen_index.get(int(c), -1) for c in parity.labels], np.int64)
    # int8 calibrates on the replay buffer, or on the images handed in when the store keeps none
    calibration, calibration_source = ckpt.buffer.pixels, "replay buffer"
    if len(ckpt.buffer) == 0 and "given" in parity.info:
        calibration, calibration_source = parity.pixels[: parity.info["given"]], "images handed to the export"
    if opts.precision == "int8" and len(calibration) == 0:
        raise UsageError("int8 calibration needs replay-buffer images; this checkpoint has none")
    int8_weights = resolve_int8_weights(opts.int8_weights)
    try:
        # Scratch inside the bundles folder, not /tmp, for our files and the exporter's and quantiser's
        # own temp files: a killed export leaves ".tmp-*" entries that the next writer's clean_stale_tmp
        # removes, and a full store disk fails here, visibly.
        with scratch_dir(root) as work:
            if backbone is not None and features is not None:
                head, exporter = export_fp32(graph, torch.from_numpy(features[:2]), GRAPH_OPSET, work, opts.exporter)
                gc.collect()  # the exporter's traced programs hold reference cycles
                release_freed_memory()
                fp32 = compose_backbone(backbone, head, opts.opset)
                del head
                exporter = f"the store's backbone graph + the head by {exporter}"
            else:
                fp32, exporter = export_fp32(
                    graph, image_example(ckpt.prep.image_size), opts.opset, work, opts.exporter
                )
            gc.collect()  # the exporter's traced programs hold reference cycles
            release_freed_memory()
            if opts.precision == "fp32":
                model_bytes = fp32
            elif opts.precision == "fp16":
                model_bytes = to_fp16(fp32)
            else:
                model_bytes = to_int8(
                    fp32, LazyNormalised(calibration, ckpt.prep), opts.calibration, work, int8_weights
                )
            figures = parity_figures(ref, onnx_outputs(model_bytes, x, batch), val_labels)
    except CvmError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter/quantiser failures become one line; nothing was published
        raise CvmError(f"{opts.precision} export failed ({type(exc).__name__}: {exc}); nothing was published") from None
    reference = "torch fp32 (eval) on the same normalised inputs"
    if features is not None:
        reference = "torch fp32 head (eval) on the store's backbone graph's features of the same inputs"
    figures.update(images=parity.info, reference=reference)
    figures["gates"] = GATES[opts.precision]
    if opts.precision == "int8":
        figures["calibration"] = {
            "method": opts.calibration,
            "images": len(calibration),
            "source": calibration_source,
            "weights": int8_weights,  # the Predictor warns where this CPU's fast exact kind differs
            "weights_chosen_by": "auto (this CPU)" if opts.int8_weights == "auto" else "asked",
        }
    check_gates(opts.precision, figures, opts.min_parity_images)
    figures["passed"] = True

    name = next_bundle_name(root, ckpt.version, opts.precision)
    manifest = build_manifest(ckpt, name, opts, model_bytes, exporter, figures, routing)
    path = publish_bundle(root, name, {MODEL_FILE: model_bytes, CONCEPTS_FILE: ckpt.table.to_bytes()}, manifest)
    return ExportResult(name, path, manifest)


def export_locked(
    workdir: Path, version: int | None, opts: ExportOptions, images_dir: Path | None = None
) -> ExportResult:
    """``cvm export``: take the store lock, then :func:`export_bundle` (with the images of
    ``images_dir`` for parity, read through the store's table and preprocessing)."""
    store = CheckpointStore(workdir)
    if not store.exists():
        raise UsageError(f"{workdir} has no checkpoints; run `cvm init` and `cvm update` first")
    with FileLock(store.lock_path, "cvm export"):
        images = None
        if images_dir is not None:
            from cvm_edge.data import load_image_folder

            ckpt = store.load(version)
            images = load_image_folder(images_dir, ckpt.table, ckpt.prep)
        return export_bundle(workdir, version, opts, images)
