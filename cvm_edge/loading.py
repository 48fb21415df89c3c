"""A store's version as a torch model: the whole model (timm backbone and head), or the head alone
where the store keeps its backbone as a checked ONNX graph (cvm_edge.backbone_graph), which
onnxruntime runs instead of timm."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cvm_edge.backbone_graph import graph_width
from cvm_edge.checkpoints import Checkpoint
from cvm_edge.errors import StoreError
from cvm_edge.model import CvmModel, build_head_model, build_model


def model_from_checkpoint(ckpt: Checkpoint) -> CvmModel:
    return _loaded(ckpt, lambda: build_model(ckpt.model_config, ckpt.table.as_float32()), ckpt.weights)


def head_from_checkpoint(ckpt: Checkpoint) -> CvmModel:
    """The model of a store that keeps its backbone graph, without the backbone (no timm): features
    in, logits out (cvm_edge.model.FeatureInput). Its backbone runs in onnxruntime."""
    graph = ckpt.backbone_graph
    if graph is None:
        raise StoreError(f"checkpoint v{ckpt.version} keeps no backbone graph")
    head = {k: v for k, v in ckpt.weights.items() if not k.startswith("backbone.")}
    return _loaded(ckpt, lambda: build_head_model(ckpt.model_config, ckpt.table.as_float32(), graph_width(graph)), head)


def _loaded(ckpt: Checkpoint, build: Callable[[], CvmModel], weights: dict[str, torch.Tensor]) -> CvmModel:
    """``build()`` holding ``weights`` exactly, in eval mode; StoreError when they do not fit."""
    try:
        model = build()
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or an unknown backbone: a store edited by hand
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"checkpoint v{ckpt.version} does not build into a model: {first}") from None
    if missing or unexpected:
        raise StoreError(f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def analytic_model(ckpt: Checkpoint) -> CvmModel:
    """The model an analytic computation on features needs (a solve, a vote, a score): the head alone
    where the store keeps its backbone graph (no timm), else the whole model."""
    return head_from_checkpoint(ckpt) if ckpt.backbone_graph is not None else model_from_checkpoint(ckpt)


def version_weights(prev: Checkpoint, model: CvmModel) -> dict[str, torch.Tensor]:
    """The weights of ``prev``'s next version: ``model``'s, and the frozen backbone's from ``prev``
    where the model was built without it (:func:`head_from_checkpoint`)."""
    backbone = {k: v for k, v in prev.weights.items() if k.startswith("backbone.")}
    return {**backbone, **model.weights_state()}


def graph_to_run(ckpt: Checkpoint, device: str = "cpu") -> bytes | None:
    """The store's backbone graph where an update, export or prediction of ``ckpt`` runs it instead of a
    timm module: analytic stores that keep one, on the CPU (on a GPU the torch module is faster); else None."""
    if ckpt.model_config.analytic and torch.device(device).type == "cpu":
        return ckpt.backbone_graph
    return None
