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

import numpy as np
import torch
import torch.nn.functional as F

from cvm_edge.augment import random_crop_flip, to_input
from cvm_edge.strategy import Batch, Context, Output, Plugin, restricted_logits, targets_in


class DerPlugin(Plugin):
    name = "der"
    uses_buffer = True

    def __init__(self, alpha: float = 0.1, beta: float = 0.5) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError("der alpha and beta must be >= 0")
        self.alpha = alpha
        self.beta = beta
        self._gen = torch.Generator()

    def before_experience(self, ctx: Context) -> None:
        self._gen = torch.Generator().manual_seed(ctx.config.seed + 104729)

    def _prepare(self, ctx: Context, inputs: torch.Tensor) -> torch.Tensor:
        if ctx.cached:
            return inputs
        x = to_input(inputs, ctx.prep)
        if ctx.config.augment:
            x = random_crop_flip(x, ctx.config.crop_pad, self._gen)
        if ctx.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        n = ctx.config.replay_batch_size
        if len(ctx.buffer) == 0 or n == 0 or (self.alpha == 0 and self.beta == 0):
            return None
        idx_mse = ctx.buffer.sample(n, ctx.rng)
        idx_ce = ctx.buffer.sample(n, ctx.rng) if self.beta > 0 else idx_mse[:0]
        idx_all = torch.from_numpy(np.concatenate([idx_mse, idx_ce]))
        x = self._prepare(ctx, ctx.buffer_inputs.index_select(0, idx_all.to(ctx.buffer_inputs.device)))
        _, logits = ctx.forward_head(ctx.model, x)
        logits = logits.float()
        m = len(idx_mse)
        total = torch.zeros((), device=logits.device)
        if self.alpha > 0:
            stored = torch.from_numpy(ctx.buffer.logits[idx_mse].astype("float32")).to(logits.device)
            width = min(stored.shape[1], logits.shape[1])
            total = total + self.alpha * F.mse_loss(logits[:m, :width], stored[:, :width])
        if self.beta > 0:
            y = torch.from_numpy(ctx.buffer.labels[idx_ce]).to(logits.device)
            total = total + self.beta * F.cross_entropy(
                restricted_logits(logits[m:], ctx.seen), targets_in(y, ctx.seen)
            )
        return total
