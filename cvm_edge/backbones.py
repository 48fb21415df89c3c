"""timm backbones, including CIFAR-style small-image ResNets registered under their own names.

``resnet18_cifar`` is the reduced ResNet-18 of the continual-learning literature (Buzzega et al.
2020): 3x3 stride-1 stem, no max-pool, 64 base filters, about 11M parameters. ``resnet10_cifar_slim``
is a 16-filter, one-block-per-stage sibling small enough for tests and the CPU demo;
``resnet18_cifar_w16`` the 16-filter ResNet-18 (CPU probes beside Mammoth's ``--num_filters 16``).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cvm_edge import vocabulary

if TYPE_CHECKING:
    from timm.models.resnet import ResNet

log = logging.getLogger(__name__)

TRAIN_BACKBONE_CHOICES = vocabulary.TRAIN_BACKBONE
# Popular timm edge backbones, each checked through init -> update -> export -> predict
# (tests/integration/test_backbone_zoo.py, bench/zoo.py); any other timm name works the same way.
EDGE_ZOO = (
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "ghostnet_100",
    "lcnet_050",
    "efficientvit_b0",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "resnet18",
    "convnext_atto",
    "regnetx_002",
    "mobilevitv2_050",
    "vit_tiny_patch16_224",
)


def _cifar_resnet(layers: tuple[int, ...], channels: tuple[int, ...], **kwargs: Any) -> ResNet:
    from timm.models.resnet import BasicBlock, ResNet

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


def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    return _cifar_resnet((2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


def resnet18_cifar_w16(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """resnet18_cifar's layout with 16 base filters: Mammoth's ``resnet18`` at ``--num_filters 16``
    (CPU probes beside Mammoth, issue 20)."""
    return _cifar_resnet((2, 2, 2, 2), (16, 32, 64, 128), **kwargs)


def resnet10_cifar_slim(pretrained: bool = False, **kwargs: Any) -> ResNet:
    return _cifar_resnet((1, 1, 1, 1), (16, 32, 64, 128), **kwargs)


@functools.cache
def timm_module() -> ModuleType:
    """timm, imported on first use, with the CIFAR ResNets above registered under their names.

    Imported lazily because timm imports torchvision, which registers torch's operator library
    (~170 MB of RSS and 1-3 s on 2 cores): a process that only reads a store, checks a bundle or
    answers a fleet message never builds a backbone and need not pay it. Cached: timm's registry is
    process-wide, and registering a name twice only warns, but once is enough."""
    import timm
    from timm.models import register_model

    for fn in (resnet18_cifar, resnet18_cifar_w16, resnet10_cifar_slim):
        register_model(fn)
    return timm


# Sizes tried when a backbone refuses the asked one, to name the ones that work in the error.
PROBE_SIZES = (32, 64, 96, 128, 160, 192, 224, 256)


def size_kwargs(name: str, image_size: int | None) -> dict[str, Any]:
    """timm keyword arguments that build ``name`` for ``image_size`` inputs.

    Models whose pretrained config says ``fixed_input_size`` (ViT, DeiT, Swin, LeViT, ...) size
    their position embeddings or attention biases at construction: they get ``img_size``. Every
    other model runs at any size and is built exactly as before (no extra argument)."""
    if image_size is None:
        return {}
    cfg = timm_module().models.get_pretrained_cfg(name)
    if cfg is None or not cfg.fixed_input_size or tuple(cfg.input_size[-2:]) == (image_size, image_size):
        return {}
    return {"img_size": image_size}


def create_backbone(name: str, pretrained: bool = False, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``) that returns pooled features; with
    ``image_size``, built for that input size where the model fixes one (:func:`size_kwargs`)."""
    sized = size_kwargs(name, image_size)
    timm = timm_module()
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, exportable=True, **sized, **kwargs)
    except TypeError:
        if not sized:
            raise
        # The constructor takes no img_size: build it at its own size; check_image_size says which work.
        return timm.create_model(name, pretrained=pretrained, num_classes=0, exportable=True, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            from cvm_edge.errors import UsageError

            raise UsageError(f"unknown timm backbone {name!r}") from None
        raise


def _forward_one(backbone: nn.Module, image_size: int) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return backbone(torch.zeros(1, 3, image_size, image_size))
    finally:
        backbone.train(was_training)


def _runs_at(name: str, image_size: int) -> bool:
    """Does ``name`` run at ``image_size``? Built and run on the meta device: shapes only, no weight
    init and no arithmetic, so probing a list of sizes costs a fraction of a second each."""
    try:
        with torch.device("meta"):
            _forward_one(create_backbone(name, image_size=image_size), image_size)
    except Exception:  # noqa: BLE001 - any failure means "not at this size"
        return False
    return True


def check_image_size(backbone: nn.Module, name: str, image_size: int) -> None:
    """Run one dummy image of ``image_size`` through ``backbone`` (``cvm init`` does, before writing
    anything): a size the model cannot take is a usage error naming the sizes that work, and the
    output width must be :func:`feature_dim`, which the head is built for."""
    from cvm_edge.errors import CvmError, UsageError

    try:
        out = _forward_one(backbone, image_size)
    except Exception as exc:  # noqa: BLE001 - timm raises AssertionError/RuntimeError for a wrong size
        works = [s for s in PROBE_SIZES if s != image_size and _runs_at(name, s)]
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        listed = ", ".join(map(str, works)) if works else f"none of {', '.join(map(str, PROBE_SIZES))}"
        raise UsageError(
            f"backbone {name!r} does not run at --image-size {image_size} ({reason}); sizes that work: {listed}"
        ) from None
    width = feature_dim(backbone)
    if tuple(out.shape) != (1, width):
        raise CvmError(f"backbone {name!r} returns features of shape {tuple(out.shape)}, expected (1, {width})")


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
    """Width of the pooled features ``backbone(x)`` returns.

    timm's ``num_features`` is the width of the last feature map; models with a head conv after
    pooling (MobileNetV3/V4, GhostNet, LCNet, EfficientViT) return ``head_hidden_size`` features
    instead (e.g. 1024, not 576, for mobilenetv3_small_100). timm sets ``head_hidden_size`` on
    every model, equal to ``num_features`` where there is no head conv."""
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(backbone).__name__} names no feature width (head_hidden_size or num_features)")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
