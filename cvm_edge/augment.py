"""Batch augmentation and normalisation in torch, on whatever device the batch lives on."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cvm_edge.preprocess import Preprocessing


@functools.lru_cache(maxsize=16)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building a tensor from Python numbers on a GPU is a host-to-device copy
    # that waits for the whole queue, twice per batch otherwise.
    return (
        torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
        torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device),
    )


def to_input(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW; the same arithmetic as ``preprocess.normalise``."""
    x = pixels.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
    mean, std = _channel_constants(tuple(prep.mean), tuple(prep.std), x.device)
    return ((x - mean) / std).contiguous()


def black_fill(prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """A black pixel in the normalised input, ``[1, 3, 1, 1]``: the ``fill`` that pads as torchvision's
    RandomCrop does before normalising."""
    mean, std = _channel_constants(tuple(prep.mean), tuple(prep.std), device)
    return -mean / std


def random_crop_flip(
    x: torch.Tensor, pad: int, generator: torch.Generator, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample random crop after ``pad`` pixels of padding, and a random horizontal flip.

    The padding is 0 in the normalised input (the normalisation's mean colour), or ``fill``, one
    value per channel (``[1, C, 1, 1]``): e.g. black pixels, as torchvision pads before normalising.

    Random numbers come from ``generator``, which lives on the batch's device: drawing them there
    keeps a GPU training step free of host round-trips (a seed repeats its crops on one device type).
    """
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad)) if fill is None else F.pad(x - fill, (pad, pad, pad, pad)) + fill
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        rows = (oy.view(n, 1) + torch.arange(h, device=dev).view(1, h)).view(n, 1, h, 1)
        x = padded.gather(2, rows.expand(n, c, h, w + 2 * pad))
        cols = (ox.view(n, 1) + torch.arange(w, device=dev).view(1, w)).view(n, 1, 1, w)
        x = x.gather(3, cols.expand(n, c, h, w))
    flip = torch.rand((n,), generator=generator, device=dev) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
