"""DER++ with the paper's buffer: reservoir sampling during the stream (benchmark-only plugin).

The product's buffer (:class:`cvm_edge.buffer.ReplayBuffer`) is rebalanced per class at the end of
each update, with logits recorded by the model after it: what a device that learns update by
update can keep on disk. Buzzega et al. (2020) instead offer every stream sample to a reservoir
(Vitter's algorithm R) the moment it is trained on, with the logits the model gave it then, and
replay from that reservoir from the first step on, so the current task's samples are replayed
too. This plugin does exactly that for the harness (``derpp-reservoir``, ``cvm-derpp-reservoir``),
to measure how much of the gap to the paper's DER++ the buffer policy explains.

All of it runs on the training device without a host round trip, so the step still captures as
one CUDA graph: draws are ``floor(u * filled)``; the reservoir has one spare row that takes the
writes algorithm R discards (a fixed-shape ``index_copy_`` instead of a data-dependent mask); an
empty reservoir's replay terms are multiplied by 0. Draws are with replacement (the paper's are
without), and the reservoir lives in memory for one benchmark run only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cvm_edge.plugins.der import replay_ce
from cvm_edge.strategy import Batch, Context, Output, Plugin, prepare_inputs


class ReservoirDerPlugin(Plugin):
    name = "der-reservoir"
    keeps_configured_loss = True  # the concept head keeps ACE, as with the product buffer

    def __init__(self, capacity: int, alpha: float = 0.1, beta: float = 0.5) -> None:
        if capacity <= 0:
            raise ValueError("der-reservoir needs a buffer of at least one sample")
        if alpha < 0 or beta < 0:
            raise ValueError("der alpha and beta must be >= 0")
        self.capacity = capacity
        self.alpha = alpha
        self.beta = beta
        # Allocated at the first experience (shapes from its data and model), kept across experiences.
        self.inputs = torch.zeros(0)
        self.labels = torch.zeros(0)
        self.logits = torch.zeros(0)
        self.seen_count = torch.zeros(0)  # stream samples offered so far (a device scalar)

    def __len__(self) -> int:
        """Filled rows (as ``len`` of a ReplayBuffer)."""
        return 0 if self.inputs.numel() == 0 else min(int(self.seen_count), self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of the reservoir's filled rows: pixels, int64 label and float32 logits each."""
        if not len(self):
            return 0
        per_row = self.inputs[0].numel() * self.inputs.element_size() + 8 + self.logits.shape[1] * 4
        return len(self) * per_row

    def before_experience(self, ctx: Context) -> None:
        if ctx.cached:
            raise ValueError("der-reservoir stores raw images: it cannot train with a frozen (cached) backbone")
        if self.inputs.numel():
            return
        rows = self.capacity + 1  # + the spare row for discarded writes
        pixels = ctx.new_data.pixels
        self.inputs = torch.zeros((rows, *pixels.shape[1:]), dtype=torch.uint8, device=ctx.device)
        self.labels = torch.zeros(rows, dtype=torch.long, device=ctx.device)
        self.logits = torch.zeros((rows, ctx.model.table_rows), dtype=torch.float32, device=ctx.device)
        self.seen_count = torch.zeros((), dtype=torch.long, device=ctx.device)

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        total = self._replay_loss(ctx) if ctx.config.replay_batch_size > 0 else None
        self._offer(ctx, batch, out)
        return total

    def _replay_loss(self, ctx: Context) -> torch.Tensor:
        n = ctx.config.replay_batch_size
        filled = torch.clamp(self.seen_count, max=self.capacity)
        u = torch.rand(2 * n, generator=ctx.gen, device=ctx.device)
        # floor(u * filled) < filled; the clamp guards float rounding at u -> 1
        idx = torch.minimum((u * filled.clamp(min=1)).long(), filled.clamp(min=1) - 1)
        x = prepare_inputs(ctx, self.inputs.index_select(0, idx))
        labels = self.labels.index_select(0, idx)
        _, logits = ctx.forward_head(ctx.model, x, ctx.experts_for(labels))
        logits = logits.float()
        mse = F.mse_loss(logits[:n], self.logits.index_select(0, idx[:n]))
        ce = replay_ce(ctx, logits[n:], labels[n:])
        return (self.alpha * mse + self.beta * ce) * (filled > 0).float()

    def _offer(self, ctx: Context, batch: Batch, out: Output) -> None:
        """Algorithm R for each stream sample of the batch: the k-th sample (0-based) fills row k
        while there is room, then replaces a uniform row j in [0, k] when j < capacity."""
        b = len(batch.labels)
        pos = self.seen_count + torch.arange(b, device=ctx.device)
        j = (torch.rand(b, generator=ctx.gen, device=ctx.device) * (pos + 1).float()).long()
        target = torch.where(pos < self.capacity, pos, j)
        # Two samples of one batch drawn to the same row: the later one takes it, as the sequential
        # algorithm would (index_copy_ with repeated indices keeps an arbitrary writer per element
        # on CUDA, which could mix one sample's pixels with another's label); the earlier one goes
        # to the spare row, with the writes algorithm R discards.
        order = torch.arange(b, device=ctx.device)
        overwritten = ((target[:, None] == target[None, :]) & (order[None, :] > order[:, None])).any(dim=1)
        keep = (target < self.capacity) & ~overwritten
        target = torch.where(keep, target, torch.full_like(target, self.capacity))
        self.inputs.index_copy_(0, target, batch.inputs)
        self.labels.index_copy_(0, target, batch.labels)
        self.logits.index_copy_(0, target, out.logits.detach().float())
        self.seen_count.add_(b)
