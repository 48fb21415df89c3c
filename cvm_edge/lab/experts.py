"""Per-task experts on the mapper, routed by feature similarity to per-task anchors.

After HiDe-LLaVA (ACL 2025) and MLLM-CL (2025): lower layers (backbone, shared mapper) are shared;
each task adds a small low-rank residual adapter (LoRA-style: ``up @ down``, ``up`` initialised to
0, so a new expert starts as the identity) parallel to the mapper. The mapped output is

    sum_t w_t(f) * (mapper(f) + up_t(down_t(u)))  =  mapper(f) + sum_t w_t(f) * up_t(down_t(u))

with ``u = f / rms(f)`` (see :meth:`ExpertMixture.delta`) and weights that sum to 1 (0 before any
anchor exists). At inference ``w`` comes from the cosine of the backbone feature ``f`` to each
task's anchor (the running mean of that task's features): ``soft`` is ``softmax(cos / T)``,
``hard`` one-hot on the best anchor, built from ``cos == max`` (no ArgMax/OneHot, no
data-dependent shapes, so the whole routing is part of the ONNX graph). At train time routing is
by oracle (the expert of the sample's class), as in HiDe-LLaVA.

All experts are evaluated with two matmuls over their concatenated weights, whatever their count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvm_edge import vocabulary

if TYPE_CHECKING:
    from cvm_edge.buffer import ReplayBuffer
    from cvm_edge.data import ImageSet
    from cvm_edge.model import CvmModel

log = logging.getLogger(__name__)

ROUTING_CHOICES = vocabulary.EXPERT_ROUTING
EXPERT_CHOICES = vocabulary.EXPERTS
# Cosine that stands in for an anchor no data has reached yet: below any real cosine.
NO_ANCHOR_COSINE = -2.0


class Adapter(nn.Module):
    """One task's expert: ``f -> up(down(f))`` of rank ``rank``; ``up`` starts at zero."""

    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.up.weight)


class ExpertMixture(nn.Module):
    """Adapters, their anchors (``anchor_means [T, F]``, ``anchor_counts [T]``) and the map from
    table rows to the expert that learned them (``class_expert``, -1 for rows no expert learned).

    Every piece is in the state dict; :meth:`_load_from_state_dict` grows the mixture to the
    number of experts a checkpoint holds, so a plain ``load_state_dict`` restores it."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, routing: str, temperature: float) -> None:
        super().__init__()
        if routing not in ROUTING_CHOICES:
            raise ValueError(f"routing must be one of {ROUTING_CHOICES}")
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, rank
        self.routing = routing
        self.temperature = float(temperature)
        self.adapters = nn.ModuleList()
        self.anchor_means: torch.Tensor
        self.anchor_counts: torch.Tensor
        self.class_expert: torch.Tensor
        self.register_buffer("anchor_means", torch.zeros(0, in_dim))
        self.register_buffer("anchor_counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_expert", torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.adapters)

    # ----- growth ---------------------------------------------------------------------------
    def _grow(self, n: int) -> None:
        """Add adapters (and empty anchors) until there are ``n``."""
        device = self.anchor_means.device
        while len(self.adapters) < n:
            self.adapters.append(Adapter(self.in_dim, self.out_dim, self.rank).to(device))
        extra = n - len(self.anchor_means)
        if extra > 0:
            self.anchor_means = torch.cat([self.anchor_means, torch.zeros(extra, self.in_dim, device=device)])
            self.anchor_counts = torch.cat([self.anchor_counts, torch.zeros(extra, dtype=torch.long, device=device)])

    def _map_classes(self, classes: Sequence[int], expert: int) -> None:
        rows = max(len(self.class_expert), max(classes, default=-1) + 1)
        if rows > len(self.class_expert):
            pad = torch.full((rows - len(self.class_expert),), -1, dtype=torch.long, device=self.class_expert.device)
            self.class_expert = torch.cat([self.class_expert, pad])
        if classes:
            self.class_expert[torch.as_tensor(list(classes), dtype=torch.long, device=self.class_expert.device)] = (
                expert
            )

    def add_expert(self, classes: Sequence[int]) -> int:
        """A new expert for an experience over ``classes`` (table rows); returns its index.

        Earlier experts are frozen: each keeps what its task taught it (the new expert, the shared
        mapper and, per ``train_backbone``, the backbone go on training)."""
        for p in self.adapters.parameters():
            p.requires_grad_(False)
        index = len(self.adapters)
        self._grow(index + 1)
        self._map_classes(classes, index)
        return index

    @torch.no_grad()
    def update_anchor(self, expert: int, features: torch.Tensor) -> None:
        """Fold ``features [N, F]`` into the running mean of ``expert``'s anchor."""
        if not len(features):
            return
        n_old = int(self.anchor_counts[expert])
        n_new = len(features)
        total = features.float().sum(dim=0)
        mean = (self.anchor_means[expert] * n_old + total) / (n_old + n_new)
        self.anchor_means[expert] = mean
        self.anchor_counts[expert] = n_old + n_new

    @torch.no_grad()
    def refresh_anchors(self, features: torch.Tensor, labels: torch.Tensor, keep: int) -> list[int]:
        """Re-estimate every anchor but ``keep``'s from ``features`` of replayed samples (their
        ``labels`` say whose task they are); returns the experts refreshed.

        When the backbone trains, the running means of earlier tasks describe features it no longer
        produces; the class-balanced replay buffer, passed through the current backbone, is the
        best estimate left of where those tasks now lie. An expert with no replayed sample keeps
        its anchor."""
        owners = self.experts_of(labels)
        done = []
        for t in range(len(self.adapters)):
            mine = owners == t
            if t == keep or not bool(mine.any()):
                continue
            self.anchor_means[t] = features[mine].float().mean(dim=0)
            self.anchor_counts[t] = int(mine.sum())
            done.append(t)
        return done

    # ----- routing ----------------------------------------------------------------------------
    def experts_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Oracle routing: the expert of each label's class (training only)."""
        return self.class_expert.index_select(0, labels)

    def unmapped(self, labels: Sequence[int]) -> list[int]:
        """Labels no expert has learned (a training batch of them could not be routed)."""
        known = self.class_expert.tolist()
        return sorted({int(c) for c in labels if c >= len(known) or known[c] < 0})

    def route(self, f: torch.Tensor) -> torch.Tensor:
        """Routing weights ``[B, T]`` from the anchors: rows sum to 1 (0 before any anchor exists)."""
        valid = (self.anchor_counts > 0).to(f.dtype)
        anchors = F.normalize(self.anchor_means.to(f.dtype), dim=-1)
        cos = F.normalize(f, dim=-1) @ anchors.t()
        cos = torch.where(valid > 0, cos, torch.full_like(cos, NO_ANCHOR_COSINE))
        best = cos.amax(dim=-1, keepdim=True)
        if self.routing == "soft":
            # softmax over the anchors with data, written out: the best term is exactly 1, so the
            # sum lies in [1, T] and varies with the input. (torch.softmax then a renormalisation
            # by a sum that is 1 up to rounding gave int8 calibration a tensor of near-zero range,
            # on which its histogram fails.)
            w = torch.exp((cos - best) / self.temperature)
        else:
            # One-hot on the best anchor without ArgMax/OneHot: a tie splits the weight evenly.
            w = (cos == best).to(f.dtype)
        w = w * valid
        return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def delta(self, f: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_t w_t * up_t(down_t(u))`` in two matmuls over the concatenated expert weights, with
        ``u`` the RMS-normalised feature.

        The mapper is blind to the feature's scale (it LayerNorms its hidden layer); the adapters are
        made so too. On raw features (RMS ~0.09 for a fresh resnet10_cifar_slim) a trained expert
        moved the mapped output by ~0.1 % after 100 steps: too little to matter."""
        u = f * torch.rsqrt(f.pow(2).mean(dim=-1, keepdim=True) + 1e-12)
        adapters = [a for a in self.adapters if isinstance(a, Adapter)]
        down = torch.cat([a.down.weight for a in adapters])  # [T*r, F]
        up = torch.cat([a.up.weight for a in adapters], dim=1)  # [D, T*r]
        h = u @ down.t()  # [B, T*r]
        b, t = weights.shape
        scale = weights.unsqueeze(-1).expand(b, t, self.rank).reshape(b, t * self.rank)
        return (h * scale) @ up.t()

    def forward(self, f: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' residual for features ``f``: routed by anchors, or by ``experts`` (one
        index per sample, the oracle routing of training)."""
        if experts is None:
            weights = self.route(f)
        else:
            weights = F.one_hot(experts, len(self.adapters)).to(f.dtype)
        return self.delta(f, weights)

    # ----- memory and persistence -----------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the experts add to the model: adapter weights, anchors, counts and class map."""
        tensors = [*self.parameters(), self.anchor_means, self.anchor_counts, self.class_expert]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def nbytes_for(self, n_experts: int, n_rows: int) -> int:
        """:attr:`nbytes` of a mixture of ``n_experts`` over ``n_rows`` table rows: adapter weights
        and anchor (float32) and count (int64) per expert, one int64 per row of the class map.
        Known before training, so a run can give up that many bytes of replay buffer first."""
        per_expert = 4 * self.rank * (self.in_dim + self.out_dim) + 4 * self.in_dim + 8
        return n_experts * per_expert + 8 * n_rows

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Grow to the checkpoint's expert count first: torch loads this module's buffers here and
        # the adapters' weights afterwards, module by module, into what exists by then.
        means = state_dict.get(prefix + "anchor_means")
        if means is not None:
            self._grow(int(means.shape[0]))
        rows = state_dict.get(prefix + "class_expert")
        if rows is not None and rows.shape[0] > len(self.class_expert):
            self.class_expert = torch.full((int(rows.shape[0]),), -1, dtype=torch.long, device=self.class_expert.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def add_task_expert(model: CvmModel, new_data: ImageSet, buffer: ReplayBuffer) -> int:
    """A new expert for this experience's classes (see :meth:`CvmModel.add_expert`). Replayed
    images go through their own class's expert, so every buffer class must have one."""
    experts = model.experts
    if experts is None:
        raise ValueError("this model has no experts (ModelConfig.experts is 'none')")
    # Checked before the model changes: a refused experience leaves it as it was.
    new = set(new_data.classes)
    revisited = sorted(new - set(experts.unmapped(sorted(new))))
    if revisited:
        # Experts are per task of new classes and route replayed images by class: a domain update of
        # known classes would send every old domain of them through the new expert.
        raise ValueError(
            f"classes {revisited} already have an expert: per-task experts do not support updates with new images "
            "of known classes (domain-incremental) yet"
        )
    orphans = [c for c in experts.unmapped(np.unique(buffer.labels).tolist()) if c not in new]
    if orphans:
        raise ValueError(f"replay-buffer classes {orphans} belong to no expert; this buffer predates the experts")
    index = model.add_expert(new_data.classes)
    log.info("expert %d added for classes %s (%d bytes of experts)", index, list(new_data.classes), experts.nbytes)
    return index
