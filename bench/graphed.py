"""One training step captured as a CUDA graph and replayed (bench/speed.py's backend).

A small-image training step (ResNet-18 at 32 px, batch 32 + 32 replayed) launches ~700 kernels of
a few microseconds each: on a GPU the host's Python dispatch, not the card, sets the pace (about 32
steps/s measured on an H100, bench/README.md). Capturing the whole step once (batch gather,
augmentation, replay draws, forward, losses, backward, optimiser update) and replaying it costs one
launch per step, so the card becomes the limit.

The step function must be free of host synchronisation and of data-dependent shapes (the Strategy
loop is: random draws come from a generator on the device, selections use ``where``), and it must
read its per-step input only from the index tensor it is given. Capture records the kernels without
running them, so the capturing call is followed by a replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[torch.Tensor], torch.Tensor]


class GraphedStep:
    """Runs ``step(idx) -> loss`` eagerly ``warmup`` times, then captures it and replays the graph.

    The step sets gradients to ``None`` before its backward, so the captured backward writes fresh
    gradients instead of accumulating into stale ones. ``generators`` are the custom device
    generators the step draws from: their state advances with every replay. Only full batches of ``batch_size`` indices replay the graph; any other length
    (an epoch's last, partial batch) runs eagerly through the same function.
    """

    def __init__(
        self,
        step: StepFn,
        batch_size: int,
        device: torch.device,
        generators: tuple[torch.Generator, ...] = (),
        warmup: int = 3,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.step = step
        self.batch_size = batch_size
        self.device = device
        self.generators = generators
        self.warmup = warmup
        self.eager_steps = 0
        self.replays = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._idx: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def release(self) -> None:
        """Drop the graph, which frees its private memory pool; a later call captures anew."""
        self._graph, self._idx, self._loss = None, None, None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if len(idx) != self.batch_size:
            return self._eager(idx)
        if self._graph is None:
            if self.eager_steps < self.warmup:
                # Warm-up on a side stream, as torch.cuda.graphs asks: cuDNN picks its algorithms and
                # the optimiser creates its state here, outside the capture.
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    loss = self._eager(idx)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return loss
            self._capture(idx)
        assert self._graph is not None and self._idx is not None and self._loss is not None
        self._idx.copy_(idx)
        self._graph.replay()
        self.replays += 1
        return self._loss

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        self.eager_steps += 1
        return self.step(idx)

    def _capture(self, idx: torch.Tensor) -> None:
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            graph.register_generator_state(gen)
        self._idx = idx.clone()
        with torch.cuda.graph(graph):
            self._loss = self.step(self._idx)
        self._graph = graph
