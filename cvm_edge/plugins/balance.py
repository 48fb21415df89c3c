"""Class-balanced head tuning (as in EEIL, Castro et al. 2018) on the replay buffer.

After an experience the mapper and scale are tuned for ``TrainConfig.balance_epochs`` epochs on
the class-balanced buffer, which removes the bias towards the classes just trained on: the buffer
a replaying plugin rebuilt in this experience, else the store's buffer as it came (a store that
replayed before and now trains with, say, distillation only keeps its buffer and is still
balanced on it). It runs after every other plugin finished (``make_plugins`` puts it last, in
every list): EWC's Fisher and replay's new buffer are taken from the model as trained, before the
head moves.
"""

from __future__ import annotations

import dataclasses

import torch

from cvm_edge.plugins.replay import ReplayMemory
from cvm_edge.strategy import (
    LOCAL_LOSS,
    Context,
    Plugin,
    backbone_features,
    make_optimizer,
    restricted_cross_entropy,
)


class HeadBalancePlugin(Plugin):
    name = "balance"

    def __init__(self, memory: ReplayMemory) -> None:
        self.memory = memory

    def after_experience(self, ctx: Context) -> None:
        rebuilt = self.memory.rebuilt_for(ctx)
        buffer = self.memory.buffer if rebuilt and self.memory.buffer is not None else ctx.buffer
        feats = self.memory.pool_feats if rebuilt else None
        self.memory.pool_feats = None  # the memory keeps nothing of this experience on the device
        cfg, model = ctx.config, ctx.model
        if not cfg.balance_epochs or not len(buffer):
            return
        if feats is None:
            feats = backbone_features(model, ctx.prep, buffer.pixels, cfg)
        labels = torch.from_numpy(buffer.labels).to(ctx.device)
        # A fleet device (loss "local") balances among its own classes: its buffer holds no image of
        # the fleet's other classes, and over all seen rows this tuning would push them all down.
        rows = ctx.local_classes if cfg.loss == LOCAL_LOSS else ctx.seen
        params = [p for p in model.head.parameters() if p.requires_grad]
        # The run's own optimiser at half its rate (an SGD run's rate would be far too large for Adam).
        opt = make_optimizer(params, dataclasses.replace(cfg, lr=cfg.lr * 0.5))
        model.head.train()
        for _ in range(cfg.balance_epochs):
            order = torch.from_numpy(ctx.rng.permutation(len(labels))).to(ctx.device)
            for start in range(0, len(labels), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                logits = model.head(feats.index_select(0, idx))
                y = labels.index_select(0, idx)
                loss = restricted_cross_entropy(logits, y, rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
