"""Routed inference over fused task models: pick the top-k tasks by prototype similarity, average.

Routing needs a feature space that no later task moves, or the prototypes of old tasks go stale
(fusion is data-free: old images are gone, their prototypes cannot be recomputed). The base
model's backbone is that space: it is fixed by definition. Each task's prototype is the mean base
feature of its training images, taken when the task is trained. At inference the input's base
feature and the prototypes are centred on the mean prototype (backbone features after a ReLU and
pooling share a large positive component, which makes raw cosines all close to 1) and compared by
cosine; the ``k`` most similar tasks' models are combined (:data:`COMBINES`; by default the mean of
each one's softmax over its own task's classes, a mixture of experts).

The graph has fixed shapes, so it exports to ONNX as it is (TopK, comparisons, no data-dependent
control flow): every one of the ``T`` task models runs on every input and the top-k choice is a
0/1 weight. Cost: ``T + 1`` backbone passes per image (the base router and ``T`` task models) and
``T + 1`` copies of the weights in the exported graph, against one for the unified model. Fine
for a handful of tasks; for many tasks one would gather the chosen models' weights instead.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from cvm_edge.augment import to_input
from cvm_edge.data import ImageSet
from cvm_edge.lab.fusion_state import FusionState, model_with
from cvm_edge.model import CvmModel
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import eval_batch_for

DEFAULT_TOP_K = 2
# How the chosen task models' outputs are combined:
# "probs": each task model's softmax over its own task's classes only, averaged (a mixture of
#   experts); the routed logits are the log of that mixture, so the server's softmax gives it back.
#   Each task model learned only its classes: its logits for other classes are not comparable.
# "logits": the plain mean of the task models' logits over all rows (the issue's wording).
COMBINES = ("probs", "logits")
# The routed logit of a class that no chosen task knows: log of this (finite, so int8-style range
# calibration and ONNX stay finite).
MIN_PROBABILITY = 1e-12


@torch.no_grad()
def mean_feature(router: CvmModel, data: ImageSet, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """The mean backbone feature of ``data`` under ``router`` (eval mode), float32 on the CPU."""
    router.eval()
    batch_size = eval_batch_for(prep.image_size)
    total: torch.Tensor | None = None
    for i in range(0, len(data), batch_size):
        x = to_input(torch.from_numpy(data.pixels[i : i + batch_size]).to(device), prep)
        s = router.features(x).float().sum(0)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("a task prototype needs at least one image")
    return (total / len(data)).cpu()


class FusedRoutedModel(nn.Module):
    """``T`` task models rebuilt from a :class:`FusionState`, routed by base-feature prototypes.

    ``forward`` gives logits over all table rows like :class:`CvmModel`;
    :meth:`logits_and_embedding` adds the embedding (the normalised mean of the chosen task
    models' embeddings), which is what the bundle's ``embedding`` output carries."""

    def __init__(self, template: CvmModel, state: FusionState, k: int = DEFAULT_TOP_K, combine: str = "probs") -> None:
        super().__init__()
        if state.n_tasks == 0 or state.prototypes is None:
            raise ValueError("routing needs at least one fused task with its prototype")
        if k < 1:
            raise ValueError("top-k needs k >= 1")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}")
        self.combine = combine
        self.n_tasks = state.n_tasks
        self.k = min(k, self.n_tasks)
        self.task_classes = state.task_classes
        self.router = model_with(template, state.base, state.base_stats)
        self.tasks = nn.ModuleList(
            model_with(template, state.task_params(t), state.full_stats(t)) for t in range(self.n_tasks)
        )
        protos = state.prototypes.float()
        center = protos.mean(0, keepdim=True)
        self.center: torch.Tensor
        self.prototypes: torch.Tensor
        device = next(template.parameters()).device
        self.register_buffer("center", center.to(device))
        self.register_buffer("prototypes", F.normalize(protos - center, dim=-1).to(device))
        rows = template.table_rows
        known = torch.zeros(self.n_tasks, rows, dtype=torch.bool)
        for t, classes in enumerate(state.task_classes):
            known[t, list(classes)] = True
        self.known: torch.Tensor  # [T, C]: the table rows each task model was trained on
        self.register_buffer("known", known.to(device))
        self.eval()

    def with_k(self, k: int) -> FusedRoutedModel:
        """The same task models and prototypes (shared, not copied) routed to the top ``k``."""
        if k < 1:
            raise ValueError("top-k needs k >= 1")
        other = copy.copy(self)
        other.k = min(k, self.n_tasks)
        return other

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] cosine of the input's centred base feature to each task's centred prototype."""
        f = F.normalize(self.router.features(x).float() - self.center, dim=-1)
        return f @ self.prototypes.t()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T]: 1/k for the ``k`` best-scoring tasks, 0 for the rest (ties share the weight)."""
        s = self.scores(x)
        kth = torch.topk(s, self.k, dim=1).values[:, -1:]
        w = (s >= kth).to(s.dtype)
        return w / w.sum(dim=1, keepdim=True)

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(x).unsqueeze(-1)  # [B, T, 1]
        outs = [cast(CvmModel, m).logits_and_embedding(x) for m in self.tasks]
        task_logits = torch.stack([o[0] for o in outs], dim=1)  # [B, T, C]
        z = F.normalize((w * torch.stack([o[1] for o in outs], dim=1)).sum(1), dim=-1)
        if self.combine == "logits":
            return (w * task_logits).sum(1), z
        # A finite fill (not -inf): exp of it is exactly 0 in float32, and every tensor stays finite.
        own = task_logits.masked_fill(~self.known, -1e4)
        mixture = (w * torch.softmax(own, dim=-1)).sum(1)
        # clamp, not "+ 1e-12": the exported graph lost the tiny addend (onnxruntime gave log(0) = -inf).
        return torch.log(mixture.clamp_min(MIN_PROBABILITY)), z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[1]
