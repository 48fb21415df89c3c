"""Experience replay: each batch of new data is joined by a batch drawn from the buffer."""

from __future__ import annotations

import dataclasses

import torch

from cvm_edge.strategy import Batch, Context, Plugin


class ReplayPlugin(Plugin):
    name = "replay"
    uses_buffer = True

    def extend_batch(self, ctx: Context, batch: Batch) -> Batch:
        idx = ctx.sample_buffer(ctx.config.replay_batch_size)
        if idx is None:
            return batch
        logits = ctx.buffer_logits.index_select(0, idx)
        old_logits = batch.buffer_logits
        if old_logits is None:
            old_logits = torch.zeros((len(batch.labels), logits.shape[1]), device=ctx.device)
        return dataclasses.replace(
            batch,
            inputs=torch.cat([batch.inputs, ctx.buffer_inputs.index_select(0, idx)]),
            labels=torch.cat([batch.labels, ctx.buffer_labels.index_select(0, idx)]),
            from_buffer=torch.cat([batch.from_buffer, torch.ones(len(idx), dtype=torch.bool, device=ctx.device)]),
            buffer_logits=torch.cat([old_logits, logits]),
        )
