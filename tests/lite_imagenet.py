"""ImageNet measurement helpers for the offline Lite weights' tests (not the product's path: the
product preprocesses with ``cvm_edge.preprocess``, whose geometry these repeat)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.imagenet_info import ImageNetInfo

from cvm_edge.pretrained_lite0 import LITE0_INPUT_SIZE, LITE0_PREPROCESS, LitePreprocess


def imagenet_class_indices(wnids: Sequence[str]) -> list[int]:
    """Map WordNet ids (``n01440764``...) to ImageNet-1k class indices.

    Raises:
        ValueError: naming the wnids that are not ImageNet-1k classes.
    """
    names = ImageNetInfo().label_names()
    index = {name: i for i, name in enumerate(names)}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"not ImageNet-1k wnids: {', '.join(sorted(set(unknown)))}")
    return [index[w] for w in wnids]


def preprocess_images(
    images: Iterable[Image.Image],
    preprocess: LitePreprocess = LITE0_PREPROCESS,
    size: int = LITE0_INPUT_SIZE,
) -> torch.Tensor:
    """Turn Pillow images into a normalised ``(N, 3, size, size)`` float32 batch.

    Each image is converted to RGB, its shorter side resized to
    ``round(size / crop_pct)`` with the Pillow filter named by
    ``preprocess.interpolation`` (skipped when already that size), the centre
    ``size x size`` cropped, scaled to [0, 1] and normalised by mean/std.
    This is the same geometry as ``cvm_edge.preprocess.resize_crop``.
    """
    if preprocess.interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"unsupported interpolation {preprocess.interpolation!r}")
    resample = Image.Resampling.BICUBIC if preprocess.interpolation == "bicubic" else Image.Resampling.BILINEAR
    target = max(size, round(size / preprocess.crop_pct))
    arrays = []
    for img in images:
        rgb = img.convert("RGB")
        w, h = rgb.size
        ratio = target / min(w, h)
        new_w, new_h = max(size, round(w * ratio)), max(size, round(h * ratio))
        if (new_w, new_h) != (w, h):
            rgb = rgb.resize((new_w, new_h), resample)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(rgb, dtype=np.float32))
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous()
