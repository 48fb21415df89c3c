"""How the gradient loop's steps run on the hardware: the one seam for speed machinery.

The product trains eagerly in float32 (:data:`EAGER`): on a device's CPU that is also the fastest.
The benchmarks' GPU speed-ups (bfloat16 autocast, ``torch.compile``, CUDA-graph capture of a whole
step) are a backend of their own in ``bench/speed.py`` and plug in here, so neither the loop nor
its :class:`~cvm_edge.strategy.TrainConfig` carries them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from cvm_edge.model import CvmModel

StepFn = Callable[[torch.Tensor], torch.Tensor]


class TrainerBackend(Protocol):
    """The four points where the loop hands its steps to the hardware."""

    @property
    def captures_steps(self) -> bool:
        """Whether steps are captured and replayed: Adam must then keep its step count on the device."""
        ...

    def prepare(self, model: CvmModel) -> None:
        """Once per experience, after the plugins' ``before_experience`` (distillation has copied its
        teacher from the plain model by then)."""
        ...

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        """The context the forward pass and the losses run in."""
        ...

    def run_steps(
        self, step: StepFn, batch_size: int, device: torch.device, generators: tuple[torch.Generator, ...]
    ) -> StepFn:
        """What the loop calls for each batch's indices: ``step`` itself, or a replay of it."""
        ...

    def finish(self, run_step: StepFn, optimizer: torch.optim.Optimizer, task_index: int) -> None:
        """After the experience's last step: release what ``run_steps`` holds."""
        ...


@dataclasses.dataclass(frozen=True)
class Eager:
    """Plain eager float32 steps: the product's backend."""

    @property
    def captures_steps(self) -> bool:
        return False

    def prepare(self, model: CvmModel) -> None:
        return None

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def run_steps(
        self, step: StepFn, batch_size: int, device: torch.device, generators: tuple[torch.Generator, ...]
    ) -> StepFn:
        return step

    def finish(self, run_step: StepFn, optimizer: torch.optim.Optimizer, task_index: int) -> None:
        return None


EAGER = Eager()
