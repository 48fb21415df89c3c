"""Distillation from the model as it was before this update, on new and replayed inputs.

``embedding``: pull the student's concept-space embedding towards the teacher's (1 - cosine);
it keeps the geometry that old classes rely on without constraining the new rows.
``logits``: temperature-scaled KL on the old classes' logits (LwF-style; the choice for a
linear head, whose "embedding" is the raw backbone feature).

With ``similarity_scaling = P != 0`` the weight of each experience is multiplied by the task
similarity factor of :mod:`cvm_edge.lab.similarity` (new classes close to old ones: distil harder).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from cvm_edge import vocabulary
from cvm_edge.lab.similarity import experience_factor
from cvm_edge.model import CvmModel
from cvm_edge.strategy import Batch, Context, Output, Plugin

log = logging.getLogger(__name__)

TARGETS = vocabulary.DISTILL_TARGETS


class DistillPlugin(Plugin):
    name = "distill"

    def __init__(
        self, weight: float = 1.0, target: str = "embedding", temperature: float = 2.0, similarity_scaling: float = 0.0
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"distill target must be one of {TARGETS}")
        if weight < 0 or temperature <= 0:
            raise ValueError("distill weight must be >= 0 and temperature > 0")
        self.weight = weight
        self.target = target
        self.temperature = temperature
        self.similarity_scaling = similarity_scaling
        self.factor = 1.0  # this experience's similarity factor (1 unless scaling is on)
        self.teacher: CvmModel | None = None  # the model as it was before this experience (frozen)

    @property
    def effective_weight(self) -> float:
        return self.weight * self.factor

    def before_experience(self, ctx: Context) -> None:
        self.teacher = None
        if len(ctx.old_classes):
            self.teacher = copy.deepcopy(ctx.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.factor = experience_factor(ctx, self.similarity_scaling)
        if self.similarity_scaling:
            log.info(
                "distill weight %g x similarity factor %.3f = %.4g", self.weight, self.factor, self.effective_weight
            )

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        if self.teacher is None or self.effective_weight == 0:
            return None
        with torch.no_grad():
            z_t, logits_t = ctx.forward_head(self.teacher, out.x)
        if self.target == "embedding":
            return self.effective_weight * (1.0 - (out.embeddings * z_t).sum(dim=-1)).mean()
        old = ctx.old_classes
        t = self.temperature
        student = F.log_softmax(out.logits.index_select(1, old) / t, dim=-1)
        teacher = F.softmax(logits_t.index_select(1, old) / t, dim=-1)
        return self.effective_weight * F.kl_div(student, teacher, reduction="batchmean") * (t * t)

    def after_experience(self, ctx: Context) -> None:
        self.teacher = None  # a whole model's memory: free it as soon as training is over
