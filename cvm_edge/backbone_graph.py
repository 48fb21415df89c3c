"""The frozen backbone of an analytic store as an ONNX graph kept in the store.

An analytic update runs only the frozen backbone and a small head. With the backbone's graph in the
store, ``cvm update`` builds no timm model: onnxruntime runs the graph and torch only the head. At
the peak of a device's update that is the timm/torchvision imports (~200 MB), the backbone module
and its in-memory export less (bench/update.py). The graph is made once, when the store is made (or
by the first update of a store from before), and checked against torch there on the images at hand;
after that its sha256, which each version's meta.json names (``checkpoints/graphs/<sha256>.onnx``:
one file for all versions, cvm_edge.checkpoints), vouches for it."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch

from cvm_edge.augment import to_input
from cvm_edge.preprocess import Preprocessing, normalise

# The bundle's default opset (deploy.export.DEFAULT_OPSET): the head is exported at the graph's own
# opset and composed with it, so the common export needs no conversion.
GRAPH_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "features"
# How far onnxruntime's features may be from torch's (measured: ~1e-5 for Lite0 at 224 px).
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-3


def export_graph(backbone: torch.nn.Module, image_size: int) -> bytes:
    """The frozen backbone's graph: ``input`` [batch, 3, S, S] normalised -> ``features`` [batch, F].

    TorchScript exporter: a frozen backbone's graph in about a second on 2 cores (the
    torch.export-based one takes ~10 s)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone.eval(),
            (torch.zeros(1, 3, image_size, image_size),),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to a file object too
            opset_version=GRAPH_OPSET,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return buf.getvalue()


def graph_width(graph: bytes) -> int:
    """The feature width ``F`` the graph outputs (a graph without a fixed width is refused)."""
    import onnx

    model = onnx.load_from_string(graph)
    outputs = {o.name: o for o in model.graph.output}
    if OUTPUT_NAME not in outputs or [i.name for i in model.graph.input] != [INPUT_NAME]:
        raise ValueError(f"a backbone graph reads {INPUT_NAME!r} and writes {OUTPUT_NAME!r}")
    dims = outputs[OUTPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 2 or dims[1].dim_value <= 0:
        raise ValueError("the backbone graph's features have no fixed width")
    return int(dims[1].dim_value)


def graph_digest(graph: bytes) -> str:
    return hashlib.sha256(graph).hexdigest()


def session(graph: bytes, threads: int) -> object:
    """An onnxruntime session of the graph for a small shared CPU (one image a call)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a shared small CPU
    so.enable_cpu_mem_arena = False  # one image a call: malloc is as fast, and the memory goes back
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def run_graph(sess: object, pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Features (float32 ``[n, F]``) of uint8 NHWC pixels, one image a call: as fast per image as
    batches on 2 cores, and onnxruntime then holds one image's activations (+20 MB), not eight's."""
    run = sess.run  # type: ignore[attr-defined]
    out = [run([OUTPUT_NAME], {INPUT_NAME: normalise(p, prep)})[0] for p in pixels]
    return np.concatenate(out).astype(np.float32, copy=False)


@torch.inference_mode()
def graph_mismatch(
    graph_features: np.ndarray, backbone: torch.nn.Module, prep: Preprocessing, pixels: np.ndarray
) -> float:
    """The largest difference from torch's features of the same pixels beyond float tolerance
    (0.0: they agree)."""
    x = to_input(torch.from_numpy(np.ascontiguousarray(pixels)), prep).contiguous(memory_format=torch.channels_last)
    ref = backbone.eval()(x).float().numpy()
    if ref.shape != graph_features.shape:
        return float("inf")
    if np.allclose(graph_features, ref, rtol=PARITY_RTOL, atol=PARITY_ATOL):
        return 0.0
    return float(np.abs(graph_features - ref).max())


def checked_graph(backbone: torch.nn.Module, prep: Preprocessing, seed: int = 0) -> bytes:
    """:func:`export_graph`, checked against torch on two seeded noise images (the store has none
    yet; noise runs every operator). Raises ValueError when the two differ."""
    graph = export_graph(backbone, prep.image_size)
    pixels = np.random.default_rng(seed).integers(0, 256, (2, prep.image_size, prep.image_size, 3), dtype=np.uint8)
    got = run_graph(session(graph, torch.get_num_threads()), pixels, prep)
    diff = graph_mismatch(got, backbone, prep, pixels)
    if diff:
        raise ValueError(f"the backbone's ONNX graph differs from torch by {diff:.3g}")
    return graph
