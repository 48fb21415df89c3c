"""Dark Experience Replay++ (Buzzega et al., NeurIPS 2020).

Every step draws two independent batches from the buffer: on the first the model's logits are
pulled towards the logits recorded when those samples were stored (``alpha * MSE``), on the second
the model pays the usual cross-entropy on their labels (``beta * CE`` over all seen classes).
``beta = 0`` gives plain DER. The two batches share one forward pass.

Difference from the paper: the paper fills its buffer by reservoir sampling during the stream and
records each sample's logits at that moment; our :class:`~cvm_edge.buffer.ReplayBuffer` is
rebalanced per class at the end of each experience, with logits recorded by the model trained on
that experience.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cvm_edge.plugins.replay import MemoryPlugin, ReplayMemory
from cvm_edge.strategy import Batch, Context, Output, prepare_inputs, restricted_logits, targets_in


def replay_ce(ctx: Context, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DER++'s cross-entropy on replayed labels: over the seen classes, or over every table row
    when the run trains with ``loss="ce-all"`` (mammoth's class-incremental DER++)."""
    if ctx.config.loss == "ce-all":
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(restricted_logits(logits, ctx.seen), targets_in(labels, ctx.seen))


class DerPlugin(MemoryPlugin):
    name = "der"

    def __init__(self, alpha: float = 0.1, beta: float = 0.5, memory: ReplayMemory | None = None) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError("der alpha and beta must be >= 0")
        super().__init__(memory)
        self.alpha = alpha
        self.beta = beta

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        n = ctx.config.replay_batch_size
        if self.alpha == 0 and self.beta == 0:
            return None
        mem = self.memory
        idx_mse = mem.sample(ctx, n)
        if idx_mse is None:
            return None
        # Two independent draws (as in the paper), one forward pass for both.
        idx_ce = mem.sample(ctx, n) if self.beta > 0 else idx_mse[:0]
        assert idx_ce is not None
        idx = torch.cat([idx_mse, idx_ce])
        x = prepare_inputs(ctx, mem.inputs.index_select(0, idx))
        # with per-task experts, replayed samples go through their own class's expert
        _, logits = ctx.forward_head(ctx.model, x, ctx.experts_for(mem.labels.index_select(0, idx)))
        logits = logits.float()
        m = len(idx_mse)
        total = torch.zeros((), device=logits.device)
        if self.alpha > 0:
            stored = mem.logits.index_select(0, idx_mse)
            width = min(stored.shape[1], logits.shape[1])
            total = total + self.alpha * F.mse_loss(logits[:m, :width], stored[:, :width])
        if self.beta > 0:
            y = mem.labels.index_select(0, idx_ce)
            total = total + self.beta * replay_ce(ctx, logits[m:], y)
        return total
