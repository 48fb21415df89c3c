"""The fleet's shared base: backbone, preprocessing, projection and learner settings. Every device
starts from it, and a contribution computed on another base is refused by its fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvm_edge.checkpoints import Checkpoint
from cvm_edge.concepts import ConceptTable
from cvm_edge.errors import StoreError
from cvm_edge.model import ModelConfig
from cvm_edge.preprocess import Preprocessing


def base_description(ckpt: Checkpoint) -> dict[str, Any]:
    """What a device needs to create a store on the fleet's base (JSON)."""
    return {"model": dataclasses.asdict(ckpt.model_config), "preprocessing": dataclasses.asdict(ckpt.prep)}


def base_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 of the settings, the projection (analytic stores) and the frozen backbone's weights: two
    stores with the same fingerprint lift an image to the same features, so their sums (analytic)
    or their head weights (gradient, frozen backbone) can be merged."""
    h = hashlib.sha256(json.dumps(base_description(ckpt), sort_keys=True).encode())
    if ckpt.analytic is not None:
        h.update(ckpt.analytic.projection_digest.encode())
    for name in sorted(k for k in ckpt.weights if k.startswith("backbone.")):
        t = ckpt.weights[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def config_from_description(desc: dict[str, Any]) -> tuple[ModelConfig, Preprocessing]:
    """Parse a base description (refuses unknown or missing fields with ValueError)."""
    model = dict(desc["model"])
    prep = dict(desc["preprocessing"])
    for key in ("mean", "std"):
        prep[key] = tuple(prep[key])
    return ModelConfig(**model), Preprocessing(**prep)


def init_on_base(workdir: Path, base: dict[str, Any], table: ConceptTable, learner: str) -> None:
    """Create a device's store on the fleet's ``base`` (backbone and its weights' source,
    preprocessing, head, projection seed) with the fleet's ``table``; the base must be a store of
    ``learner`` on a frozen backbone."""
    from cvm_edge.update import InitOptions, init_store

    config, prep = config_from_description(base)
    if config.learner != learner or config.train_backbone != "none":
        raise StoreError(f"the fleet's base is not a store of the {learner} learner on a frozen backbone")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.npz"
        table.save(path)
        opts = InitOptions(
            concepts=path,
            backbone=config.backbone,
            image_size=prep.image_size,
            train_backbone="none",
            head=config.head,
            mapper_hidden=config.mapper_hidden,
            pretrained=config.pretrained,
            seed=config.analytic_seed,
            learner=learner,
            # all of the base's settings, used or not: the store's config must equal the base's, whose
            # fingerprint every upload is checked against
            analytic_dim=config.analytic_dim,
            analytic_targets=config.analytic_targets,
        )
        init_store(workdir, opts)


def _fleet_entry(prev: Checkpoint, table: Any, seen: Sequence[int], learner: str) -> dict[str, Any]:
    """The history fields every fleet version carries (a fleet round trains no class locally)."""
    return {
        "task": len(prev.history) + 1,
        "kind": "fleet",
        "new_classes": [c for c in seen if c not in prev.seen],
        "new_class_names": [table.names[c] for c in seen if c not in prev.seen],
        "revisited_classes": [],
        "revisited_class_names": [],
        "trained_classes": [],
        "learner": learner,
    }


def fleet_version(
    prev: Checkpoint, table: Any, model: Any, state: Any, relative_lambda: float, entry: Mapping[str, Any]
) -> Checkpoint:
    """``prev``'s next version holding the fleet's solution (``model``'s weights, ``state``'s sums):
    the history fields every fleet version carries, then ``entry``'s (the caller's own)."""
    from cvm_edge.loading import version_weights

    seen = tuple(int(c) for c in np.flatnonzero(state.stats.counts))
    full = {
        **_fleet_entry(prev, table, seen, "analytic"),
        "relative_lambda": relative_lambda,
        "images_seen": int(state.stats.counts.sum()),
        **entry,
    }
    return dataclasses.replace(
        prev,
        table=table,
        weights=version_weights(prev, model),
        seen=seen,
        history=(*prev.history, full),
        analytic=state,
    )


def weights_version(
    prev: Checkpoint, table: Any, weights: Mapping[str, Any], seen: tuple[int, ...], entry: Mapping[str, Any]
) -> Checkpoint:
    """``prev``'s next version holding the fleet's merged head ``weights`` (a gradient fleet; the
    backbone and every other weight stay ``prev``'s) and knowing the table rows ``seen``."""
    import torch

    missing = sorted(set(weights) - set(prev.weights))
    if missing:
        raise ValueError(f"weights the store does not have: {missing[:3]}")
    state = dict(prev.weights)
    for name, value in weights.items():
        t = torch.from_numpy(np.array(value, np.float32))
        if tuple(t.shape) != tuple(state[name].shape):
            raise ValueError(f"{name} of shape {tuple(t.shape)}, the store's is {tuple(state[name].shape)}")
        state[name] = t.to(state[name].dtype)
    full = {**_fleet_entry(prev, table, seen, "gradient"), "per_class_accuracy": {}, **entry}
    return dataclasses.replace(prev, table=table, weights=state, seen=seen, history=(*prev.history, full))
