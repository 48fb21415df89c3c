"""What the faithful ``er`` / ``derpp`` take from Mammoth (aimagelab/mammoth, read at e75a491) besides
the buffer (bench.reservoir) and the loss over every output (``loss="ce-all"``).

Mammoth's seq-cifar10 normalises with CIFAR-10's channel statistics and pads its random crop with
black pixels before normalising; its ResNet-18 sets no initialisation of its own, so every layer
keeps PyTorch's default (no ``zero_init_last``: each block's last BatchNorm starts at gamma 1, not 0).
The product (and the ``-balanced`` methods) normalise with mean = std = 0.5, pad after normalising
(mid-grey) and keep timm's ResNet initialisation.
"""

from __future__ import annotations

from torch import nn

from cvm_edge.preprocess import Preprocessing

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2615)
INPUT_NORMS = ("half", "cifar10")  # mean = std = 0.5 (the product's), or CIFAR-10's statistics
INITS = ("timm", "torch")


def preprocessing(image_size: int, input_norm: str) -> Preprocessing:
    """The model's input preprocessing for a method's ``input_norm``."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if input_norm == "cifar10":
        return Preprocessing(image_size=image_size, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return Preprocessing(image_size=image_size)


def reset_to_torch_defaults(model: nn.Module) -> int:
    """Re-initialise every layer of ``model`` that has PyTorch defaults (convolutions, BatchNorm,
    linear layers) with them, in module order from the current torch seed; returns how many."""
    count = 0
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if m is not model and callable(reset):
            reset()
            count += 1
    return count
