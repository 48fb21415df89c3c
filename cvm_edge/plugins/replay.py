"""Experience replay: the plugin owns the replay buffer during an experience.

:class:`ReplayMemory` loads the store's buffer onto the training device when an experience starts
(its features, with a frozen backbone), draws from it at every step, and rebuilds it at the end
from the old entries and the experience's images, with the logits of the trained model. The
plugins that replay (``replay``, ``der``) and head balancing share one memory, so the buffer is
loaded and rebuilt once however many of them a run has.

:class:`ReplayPlugin` joins each batch of new data with a batch drawn from the memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cvm_edge.buffer import ReplayBuffer
from cvm_edge.strategy import Batch, Context, Plugin, head_logits, predict_logits


class ReplayMemory:
    """The replay buffer of one experience, on the training device."""

    def __init__(self) -> None:
        # id() of the experience's Context it was loaded / rebuilt for: replay and DER share one
        # memory and each asks; an id, not the Context, so nothing of the experience outlives it.
        self._loaded: int | None = None
        self._rebuilt: int | None = None
        self.buffer: ReplayBuffer | None = None  # after an experience: the rebuilt buffer
        self.inputs = torch.zeros(0)  # buffer pixels or their features
        self.labels = torch.zeros(0, dtype=torch.long)  # table rows
        self.logits = torch.zeros(0)  # float32 logits recorded at insertion
        self.pool_feats: torch.Tensor | None = None  # frozen backbone: features of the rebuilt buffer

    def load(self, ctx: Context) -> None:
        """The store's buffer onto the device (once per experience, whoever asks first)."""
        if self._loaded == id(ctx):
            return
        self._loaded, self._rebuilt, self.buffer, self.pool_feats = id(ctx), None, ctx.buffer, None
        self.inputs = ctx.inputs(ctx.buffer.pixels)
        self.labels = torch.from_numpy(ctx.buffer.labels).to(ctx.device)
        self.logits = torch.from_numpy(ctx.buffer.logits.astype(np.float32)).to(ctx.device)

    def rebuilt_for(self, ctx: Context) -> bool:
        """Whether a replaying plugin rebuilt the buffer in this experience."""
        return self._rebuilt == id(ctx)

    def sample(self, ctx: Context, n: int) -> torch.Tensor | None:
        """Device indices of ``n`` entries, without replacement when the buffer holds ``n``."""
        m = len(self.labels)
        if m == 0 or n <= 0:
            return None
        if m >= n:
            return torch.randperm(m, generator=ctx.gen, device=ctx.gen.device)[:n]
        return torch.randint(0, m, (n,), generator=ctx.gen, device=ctx.gen.device)

    def rebuild(self, ctx: Context) -> None:
        """The class-balanced buffer of old entries and this experience's images, with the trained
        model's logits (once per experience). With a frozen backbone the features are at hand: the
        logits and the features for head balancing cost no second backbone pass."""
        if self._rebuilt == id(ctx):
            return
        self.load(ctx)
        cfg = ctx.config
        if ctx.cached:
            new_logits = head_logits(ctx.model, ctx.train_inputs, cfg)
        else:
            new_logits = predict_logits(
                ctx.model, ctx.prep, ctx.new_data.pixels, ctx.device, cfg.eval_batch(ctx.prep.image_size)
            )
        self.buffer, sel = ctx.buffer.updated_with_selection(
            ctx.new_data,
            new_logits.astype(np.float16),
            seed=cfg.seed + 7919 * (ctx.task_index + 1),
            task=ctx.task_index,
        )
        if ctx.cached:
            self.pool_feats = torch.cat([self.inputs, ctx.train_inputs]).index_select(
                0, torch.from_numpy(sel).to(ctx.device)
            )
        # The old entries on the device are no longer needed: free them before head balancing.
        self._loaded, self._rebuilt = None, id(ctx)
        self.inputs, self.labels, self.logits = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)


class MemoryPlugin(Plugin):
    """A plugin that replays from a (possibly shared) :class:`ReplayMemory`: it loads the memory,
    rebuilds it after training and keeps its buffer, and trains with the configured loss (ACE:
    replayed images keep old classes in the softmax)."""

    def __init__(self, memory: ReplayMemory | None = None) -> None:
        self.memory = memory if memory is not None else ReplayMemory()

    def loss_kind(self, configured: str) -> str | None:
        return configured

    def before_experience(self, ctx: Context) -> None:
        self.memory.load(ctx)

    def after_experience(self, ctx: Context) -> None:
        self.memory.rebuild(ctx)

    def kept_buffer(self) -> ReplayBuffer | None:
        return self.memory.buffer


class ReplayPlugin(MemoryPlugin):
    name = "replay"

    def extend_batch(self, ctx: Context, batch: Batch) -> Batch:
        mem = self.memory
        idx = mem.sample(ctx, ctx.config.replay_batch_size)
        if idx is None:
            return batch
        logits = mem.logits.index_select(0, idx)
        old_logits = batch.buffer_logits
        if old_logits is None:
            old_logits = torch.zeros((len(batch.labels), logits.shape[1]), device=ctx.device)
        return dataclasses.replace(
            batch,
            inputs=torch.cat([batch.inputs, mem.inputs.index_select(0, idx)]),
            labels=torch.cat([batch.labels, mem.labels.index_select(0, idx)]),
            from_buffer=torch.cat([batch.from_buffer, torch.ones(len(idx), dtype=torch.bool, device=ctx.device)]),
            buffer_logits=torch.cat([old_logits, logits]),
        )
