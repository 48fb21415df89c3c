"""A fusion round's per-device masks and routing prototypes, kept as the coordinator store's fusion state.

ConDU keeps, besides the unified delta that every device serves, each device's mask (where its delta
agrees with the consensus sign) and rescale: ``start + rescale_d * mask_d * unified`` rebuilds device
``d``'s model (exactly for a device whose delta set every agreeing magnitude, approximately for the
rest). With each device's routing prototype, the mean frozen-backbone feature of its images (a
statistic: no image leaves the device), ``cvm export --experimental --fusion-routing top-k`` serves those rebuilt models,
each input routed to the ``k`` devices whose prototypes are closest (``cvm_edge.lab.routing``). The state
has the fusion plugin's format (``cvm_edge.lab.fusion_state``), so the export path is the plugin's own."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import torch

from cvm_edge.checkpoints import Checkpoint
from cvm_edge.concepts import ConceptTable
from cvm_edge.lab.fusion import Unified
from cvm_edge.lab.fusion_state import FusionState
from cvm_edge.model import build_head_model
from fleet.average import WeightsMerge

PLUGIN_KEY = "fusion"  # the checkpoint's plugin state the routed export reads (deploy.export.routed_model)
# The concept head's first layer takes the frozen backbone's features: its input width is a prototype's.
MAPPER_INPUT = "head.mapper.net.0.weight"


def feature_width(weights: Mapping[str, np.ndarray]) -> int | None:
    """The backbone feature width the head reads (a routing prototype's length), where the head has a mapper."""
    w = weights.get(MAPPER_INPUT)
    return int(w.shape[1]) if w is not None and w.ndim == 2 else None


def head_parameters(ckpt: Checkpoint, table: ConceptTable, width: int) -> set[str]:
    """Names of the head's trainable tensors (what fusion merges; buffers such as the table stay the model's)."""
    model = build_head_model(ckpt.model_config, table.as_float32(), width)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def fusion_state(merge: WeightsMerge, names: Collection[str]) -> FusionState | None:
    """The round's fusion state over the tensors ``names``; None when the round was no fusion or a
    device sent no prototype (the unified weights are published all the same)."""
    u = merge.unified
    if not isinstance(u, Unified) or merge.start is None or not merge.uploads:
        return None
    if any(up.prototype is None for up in merge.uploads):
        return None
    keep = sorted(names)
    base = {k: torch.from_numpy(np.array(merge.start[k], np.float32)) for k in keep}
    unified = Unified({k: u.delta[k] for k in keep}, tuple({k: m[k] for k in keep} for m in u.masks), u.rescales)
    prototypes = torch.from_numpy(np.stack([np.asarray(up.prototype, np.float32) for up in merge.uploads]))
    classes = tuple(tuple(up.local or up.seen) for up in merge.uploads)
    return FusionState(base, {}, unified, tuple({} for _ in merge.uploads), prototypes, classes)


def mean_feature(ckpt: Checkpoint, data_dir: Path, table: ConceptTable) -> np.ndarray:
    """A device's routing prototype: the mean frozen-backbone feature of its images (float32 ``[F]``)."""
    from cvm_edge.data import list_labelled_files
    from cvm_edge.frozen_features import BackboneFeatures, read_features
    from cvm_edge.loading import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    pairs = list_labelled_files(data_dir, table, "the fleet's table")
    extract = BackboneFeatures(model.backbone, ckpt.prep)
    feats = read_features(pairs, data_dir, ckpt.prep, extract, skip_bad=True, progress=False).features
    return np.asarray(feats.mean(0), np.float32)
