"""Pull each incoming image's embedding onto its own class's row of the concept table (with
several prototypes per class: raise its class score, :meth:`cvm_edge.model.ConceptHead.cosines`).

Why: ACE (the default loss) lets incoming images of new classes compete only among the new
classes, so old rows are not pushed down by the many new images. But that softmax is unchanged
when every new-class logit moves by the same amount: nothing asks a new image to be closer to its
own row than to an old class's row. After many epochs on the same images (cifar10-5 at 50
epochs/task, bench/BENCHMARKS.md) new test images land on old classes. ``1 - cos(z, row_y)`` fixes
the absolute position (the row is fixed; only the image's embedding moves) without pushing any
other row away, which is what makes plain cross-entropy over all seen classes forget.

Replayed images are left to the replay cross-entropy over all seen classes.
"""

from __future__ import annotations

import torch

from cvm_edge.errors import UsageError
from cvm_edge.model import ConceptHead
from cvm_edge.strategy import Batch, Context, Output, Plugin


class AlignPlugin(Plugin):
    name = "align"

    def __init__(self, weight: float = 1.0) -> None:
        if weight < 0:
            raise ValueError("align weight must be >= 0")
        self.weight = weight

    def check_head(self, head: str) -> None:
        if head != "concepts":
            raise UsageError(f"the {self.name} plugin needs the concept head; this store's head is {head}")

    def before_experience(self, ctx: Context) -> None:
        if not isinstance(ctx.model.head, ConceptHead):
            raise ValueError("the align plugin needs the concept head (a linear head has no fixed rows to align to)")

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        head = ctx.model.head
        assert isinstance(head, ConceptHead)  # checked in before_experience
        # In float32 even inside bf16 autocast: 1 - cos of a well-aligned image is a small difference.
        with torch.autocast(out.embeddings.device.type, enabled=False):
            own = head.cosines(out.embeddings.float()).gather(1, batch.labels.unsqueeze(1)).squeeze(1)
        # A mask, not boolean indexing: no host sync, and the step stays capturable as a CUDA graph.
        incoming = (~batch.from_buffer).float()
        return self.weight * ((1.0 - own) * incoming).sum() / incoming.sum().clamp_min(1.0)
