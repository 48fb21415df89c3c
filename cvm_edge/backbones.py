"""timm backbones, including CIFAR-style small-image ResNets registered under their own names.

``resnet18_cifar`` is the reduced ResNet-18 of the continual-learning literature (Buzzega et al.
2020): 3x3 stride-1 stem, no max-pool, 64 base filters, about 11M parameters. ``resnet10_cifar_slim``
is a 16-filter, one-block-per-stage sibling small enough for tests and the CPU demo;
``resnet18_cifar_w16`` the 16-filter ResNet-18 (CPU probes beside Mammoth's ``--num_filters 16``).
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

log = logging.getLogger(__name__)

TRAIN_BACKBONE_CHOICES = ("all", "last", "none")


def _cifar_resnet(layers: tuple[int, ...], channels: tuple[int, ...], **kwargs: Any) -> ResNet:
    kwargs.pop("pretrained", None)  # these are trained from scratch; there are no weights to fetch
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "exportable", "scriptable", "no_jit"):
        kwargs.pop(key, None)
    # timm sizes the stem output as 2 * stem_width only for its "deep" stem; we ask for that so the
    # stem has channels[0] outputs, then replace the three-conv stem by one conv below.
    model = ResNet(
        BasicBlock,  # type: ignore[arg-type]
        layers,
        channels=channels,
        stem_type="deep",
        stem_width=channels[0] // 2,
        **kwargs,
    )
    # Small-image stem: 3x3, stride 1, no max-pool, so a 32x32 input keeps its resolution early on.
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), channels[0], 3, stride=1, padding=1, bias=False)  # type: ignore[assignment]
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    model.feature_info[0]["reduction"] = 1
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    return _cifar_resnet((2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


@register_model
def resnet18_cifar_w16(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """resnet18_cifar's layout with 16 base filters: Mammoth's ``resnet18`` at ``--num_filters 16``
    (CPU probes beside Mammoth, issue 20)."""
    return _cifar_resnet((2, 2, 2, 2), (16, 32, 64, 128), **kwargs)


@register_model
def resnet10_cifar_slim(pretrained: bool = False, **kwargs: Any) -> ResNet:
    return _cifar_resnet((1, 1, 1, 1), (16, 32, 64, 128), **kwargs)


def create_backbone(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``) that returns pooled features."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, exportable=True, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            from cvm_edge.errors import UsageError

            raise UsageError(f"unknown timm backbone {name!r}") from None
        raise


def last_stage_prefix(backbone: nn.Module) -> str:
    """Module name where the last stage begins (from timm's feature_info)."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__} has no feature_info; use train_backbone all or none")
    entries = info.info if hasattr(info, "info") else info
    return str(entries[-1]["module"])


def set_trainable(backbone: nn.Module, mode: str) -> list[str]:
    """Freeze the backbone per ``mode``; returns the names of the trainable parameters.

    ``last`` trains the last stage and everything after it (e.g. EfficientNet's conv_head/bn2),
    in definition order, which is how timm builds every backbone we use.
    """
    if mode not in TRAIN_BACKBONE_CHOICES:
        raise ValueError(f"train_backbone must be one of {TRAIN_BACKBONE_CHOICES}, got {mode!r}")
    names = [n for n, _ in backbone.named_parameters()]
    if mode == "all":
        trainable = set(names)
    elif mode == "none":
        trainable = set()
    else:
        prefix = last_stage_prefix(backbone)
        starts = [i for i, n in enumerate(names) if n == prefix or n.startswith(prefix + ".")]
        if not starts:
            raise ValueError(f"last stage {prefix!r} owns no parameters")
        trainable = set(names[starts[0] :])
    for n, p in backbone.named_parameters():
        p.requires_grad_(n in trainable)
    return [n for n in names if n in trainable]


def feature_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)  # type: ignore[arg-type]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_device_count() -> int:
    return torch.cuda.device_count()
