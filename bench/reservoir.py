"""DER++ and ER with the paper's buffer: reservoir sampling during the stream (benchmark-only plugins).

The product's buffer (:class:`cvm_edge.buffer.ReplayBuffer`) is rebalanced per class at the end of
each update, with logits recorded by the model after it: what a device that learns update by
update can keep on disk. Buzzega et al. (2020) instead offer every stream sample to a reservoir
(Vitter's algorithm R) the moment it is trained on, with the logits the model gave it then, and
replay from that reservoir from the second step on (the first finds it empty), so the current
task's samples are replayed too. These plugins do exactly that for the harness: ``der-reservoir`` (DER++: ``derpp``,
``derpp-reservoir``, ``cvm-derpp-reservoir``) and ``replay-reservoir`` (ER: ``er``), as Mammoth's
``models/derpp.py`` / ``models/er.py`` with ``utils/buffer.py`` do.

All of it runs on the training device without a host round trip, so the step still captures as
one CUDA graph: a draw takes the ``min(n, capacity)`` filled rows with the smallest random keys
(without replacement, as Mammoth's ``np.random.choice(..., replace=False)``; unfilled rows sort
last); the reservoir has one spare row that takes the writes algorithm R discards (a fixed-shape
``index_copy_`` instead of a data-dependent mask); an empty reservoir's DER++ terms are multiplied
by 0, and ER adds no rows until something was offered (a host count: no replay at the very first
step, as Mammoth's ``buffer.is_empty()``). Mammoth draws fewer rows while fewer are filled; with
the stream batch as large as the replay batch that never happens after the first step. The
reservoir lives in memory for one benchmark run only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from cvm_edge.plugins.der import replay_ce
from cvm_edge.strategy import Batch, Context, Output, Plugin, prepare_inputs


class ReservoirPlugin(Plugin):
    """The reservoir itself: storage on the device, algorithm R, draws without replacement."""

    name = "reservoir"

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"{self.name} needs a buffer of at least one sample")
        self.capacity = capacity
        # Allocated at the first experience (shapes from its data and model), kept across experiences.
        self.inputs = torch.zeros(0)
        self.labels = torch.zeros(0)
        self.logits = torch.zeros(0)
        self.seen_count = torch.zeros(0)  # stream samples offered so far (a device scalar)
        self.offered = 0  # the same on the host; only read as "anything yet?" (see the module doc)

    def loss_kind(self, configured: str) -> str | None:
        return configured  # the concept head keeps ACE, as with the product buffer

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
            raise ValueError(f"{self.name} stores raw images: it cannot train with a frozen (cached) backbone")
        if self.inputs.numel():
            return
        rows = self.capacity + 1  # + the spare row for discarded writes
        pixels = ctx.new_data.pixels
        self.inputs = torch.zeros((rows, *pixels.shape[1:]), dtype=torch.uint8, device=ctx.device)
        self.labels = torch.zeros(rows, dtype=torch.long, device=ctx.device)
        self.logits = torch.zeros((rows, ctx.model.table_rows), dtype=torch.float32, device=ctx.device)
        self.seen_count = torch.zeros((), dtype=torch.long, device=ctx.device)

    def _draw(self, ctx: Context, n: int) -> torch.Tensor:
        """``min(n, capacity)`` distinct filled rows, uniformly (fixed shape, no host sync)."""
        filled = torch.clamp(self.seen_count, max=self.capacity)
        keys = torch.rand(self.capacity + 1, generator=ctx.gen, device=ctx.device)
        rows = torch.arange(self.capacity + 1, device=ctx.device)
        keys = keys + 2.0 * (rows >= filled).float()  # unfilled rows (and the spare) sort last
        return torch.topk(keys, min(n, self.capacity), largest=False).indices

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
        self.offered += b


class ReservoirDerPlugin(ReservoirPlugin):
    """DER++ on the reservoir: ``alpha * MSE`` to the logits recorded at insertion (the training
    forward pass: augmented input, train mode) on one draw, ``beta * CE`` on another. ``passes=2``
    runs the two draws through the model separately, as Mammoth (each its own BatchNorm batch);
    ``passes=1`` in one pass of both (``derpp-reservoir``, as first measured)."""

    name = "der-reservoir"

    def __init__(self, capacity: int, alpha: float = 0.1, beta: float = 0.5, passes: int = 1) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError("der alpha and beta must be >= 0")
        if passes not in (1, 2):
            raise ValueError("der passes must be 1 or 2")
        super().__init__(capacity)
        self.alpha = alpha
        self.beta = beta
        self.passes = passes

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        total = self._replay_loss(ctx) if ctx.config.replay_batch_size > 0 else None
        self._offer(ctx, batch, out)
        return total

    def _forward(self, ctx: Context, idx: torch.Tensor) -> torch.Tensor:
        x = prepare_inputs(ctx, self.inputs.index_select(0, idx))
        _, logits = ctx.forward_head(ctx.model, x, ctx.experts_for(self.labels.index_select(0, idx)))
        return logits.float()

    def _replay_loss(self, ctx: Context) -> torch.Tensor:
        n = ctx.config.replay_batch_size
        filled = torch.clamp(self.seen_count, max=self.capacity)
        idx_mse, idx_ce = self._draw(ctx, n), self._draw(ctx, n)
        if self.passes == 2:
            out_mse, out_ce = self._forward(ctx, idx_mse), self._forward(ctx, idx_ce)
        else:
            both = self._forward(ctx, torch.cat([idx_mse, idx_ce]))
            out_mse, out_ce = both[: len(idx_mse)], both[len(idx_mse) :]
        mse = F.mse_loss(out_mse, self.logits.index_select(0, idx_mse))
        ce = replay_ce(ctx, out_ce, self.labels.index_select(0, idx_ce))
        return (self.alpha * mse + self.beta * ce) * (filled > 0).float()


class ReservoirReplayPlugin(ReservoirPlugin):
    """ER on the reservoir: each stream batch is joined by a draw from it, trained in one forward
    pass with the stream (as Mammoth's ``er``); the stream part is offered after its loss."""

    name = "replay-reservoir"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._stream_rows = 0

    def extend_batch(self, ctx: Context, batch: Batch) -> Batch:
        self._stream_rows = len(batch.labels)
        n = ctx.config.replay_batch_size
        if self.offered == 0 or n <= 0:
            return batch
        idx = self._draw(ctx, n)
        return dataclasses.replace(
            batch,
            inputs=torch.cat([batch.inputs, self.inputs.index_select(0, idx)]),
            labels=torch.cat([batch.labels, self.labels.index_select(0, idx)]),
            from_buffer=torch.cat([batch.from_buffer, torch.ones(len(idx), dtype=torch.bool, device=ctx.device)]),
        )

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        b = self._stream_rows
        stream = Batch(inputs=batch.inputs[:b], labels=batch.labels[:b], from_buffer=batch.from_buffer[:b])
        self._offer(ctx, stream, dataclasses.replace(out, logits=out.logits[:b]))
        return None
