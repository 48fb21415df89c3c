"""The benchmarks' GPU speed-ups as one trainer backend (``cvm_edge.trainer_backend``).

The product trains eagerly in float32. For GPU grids the benchmarks may add, each recorded in a
result's hyperparameters:

- ``amp_bf16``: bfloat16 autocast for the forward pass and the losses;
- ``compile_mode``: ``torch.compile`` of a trained backbone (e.g. ``reduce-overhead``);
- ``cuda_graph``: the whole step captured once as a CUDA graph and replayed (bench/graphed.py): one
  launch a step instead of hundreds, for small-image training where the host sets the pace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from contextlib import AbstractContextManager

import torch

from bench.graphed import GraphedStep
from cvm_edge.model import CvmModel
from cvm_edge.trainer_backend import EAGER, StepFn, TrainerBackend

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpeedBackend:
    device: str = "cpu"
    amp_bf16: bool = False
    compile_mode: str = ""  # "" off
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.cuda_graph and not self.device.startswith("cuda"):
            raise ValueError("cuda_graph needs a CUDA device")
        if self.cuda_graph and self.compile_mode:
            raise ValueError("cuda_graph captures the whole step itself: leave compile_mode empty")

    @property
    def captures_steps(self) -> bool:
        return self.cuda_graph

    def prepare(self, model: CvmModel) -> None:
        """``torch.compile`` a trained backbone, once per model."""
        if self.compile_mode and not model.backbone_frozen and not getattr(model.backbone, "_cvm_compiled", False):
            # In place: state-dict keys stay those of the plain module, so checkpoints are unchanged.
            model.backbone.compile(mode=self.compile_mode)
            setattr(model.backbone, "_cvm_compiled", True)  # noqa: B010 (nn.Module typing)

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        if not self.amp_bf16:
            return contextlib.nullcontext()
        # Autocast's weight cache must be off inside a CUDA graph capture (torch.cuda.graphs).
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)

    def run_steps(
        self, step: StepFn, batch_size: int, device: torch.device, generators: tuple[torch.Generator, ...]
    ) -> StepFn:
        return GraphedStep(step, batch_size, device, generators=generators) if self.cuda_graph else step

    def finish(self, run_step: StepFn, optimizer: torch.optim.Optimizer, task_index: int) -> None:
        if isinstance(run_step, GraphedStep):
            log.info(
                "task %d: %d steps replayed from a CUDA graph, %d eager",
                task_index,
                run_step.replays,
                run_step.eager_steps,
            )
            optimizer.zero_grad(set_to_none=True)  # the gradients live in the graph's memory pool too
            run_step.release()


def speed_backend(device: str, amp_bf16: bool, compile_mode: str, cuda_graph: bool) -> TrainerBackend:
    """The product's eager backend when no speed-up is asked for, so such runs train as ``cvm`` does."""
    if not (amp_bf16 or compile_mode or cuda_graph):
        return EAGER
    return SpeedBackend(device, amp_bf16, compile_mode, cuda_graph)
