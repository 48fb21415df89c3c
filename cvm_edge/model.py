"""CvmModel: a timm backbone, a Mapper into the concept space, and a head.

``head="concepts"``: ``logits = exp(logit_scale) * normalise(mapper(f)) @ table.T`` with a fixed
table (a buffer, never trained): adding a class adds a row, the head never changes shape. With a
multi-prototype table each class score aggregates the cosines to its prototypes with a
temperature-scaled log-mean-exp (see :meth:`ConceptHead.class_scores`).
``head="linear"``: an ordinary learned classifier over the same class rows, for baselines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvm_edge import vocabulary
from cvm_edge.analytic import DEFAULT_DIM, TARGETS, projection, whiten_table
from cvm_edge.backbones import TRAIN_BACKBONE_CHOICES, create_backbone, feature_dim, set_trainable
from cvm_edge.lab.experts import EXPERT_CHOICES, ROUTING_CHOICES, ExpertMixture

HEAD_CHOICES = vocabulary.HEADS
MAX_LOGIT_SCALE = math.log(100.0)
# LogSumExp temperature over a class's prototype cosines: 0.1 sits between "best prototype wins"
# (T -> 0, max) and "all prototypes count alike" (T -> inf, mean); cosines span [-1, 1].
DEFAULT_PROTOTYPE_TEMPERATURE = vocabulary.DEFAULT_PROTOTYPE_TEMPERATURE
# Stands in for the cosine of a padding slot: below any real cosine (unit vectors: >= -1).
PAD_COSINE = -2.0
# Per-task experts (cvm_edge.lab.experts); off by default. The fields are left out of ``to_dict`` while
# off, so checkpoints and bundles of models without experts keep exactly today's metadata.
EXPERT_FIELDS = ("experts", "expert_rank", "routing", "routing_temperature", "expert_shared_mapper")
SHARED_MAPPER_CHOICES = vocabulary.SHARED_MAPPER
DEFAULT_ROUTING_TEMPERATURE = vocabulary.DEFAULT_ROUTING_TEMPERATURE
# How the head learns: "gradient" (the Strategy's training loop) or "analytic" (closed-form ridge on
# a fixed random ReLU projection of frozen features: cvm_edge.analytic). The analytic fields are
# left out of ``to_dict`` for gradient stores, whose metadata stays exactly as it was.
LEARNER_CHOICES = vocabulary.LEARNERS
ANALYTIC_FIELDS = ("learner", "analytic_dim", "analytic_seed", "analytic_targets")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str
    image_size: int
    train_backbone: str = "all"
    head: str = vocabulary.INIT["head"].default
    mapper_hidden: int = vocabulary.INIT["mapper_hidden"].default  # 0 gives a linear mapper
    init_logit_scale: float = math.log(16.0)
    pretrained: str = "none"  # none | offline | hub | a local checkpoint path
    # Multi-prototype tables only (single-prototype logits do not depend on it); stored in the
    # checkpoint and the bundle manifest with the rest of this config.
    prototype_temperature: float = DEFAULT_PROTOTYPE_TEMPERATURE
    # "adapter": one low-rank residual adapter per task on the mapper, routed by anchors.
    experts: str = vocabulary.INIT["experts"].default
    expert_rank: int = vocabulary.INIT["expert_rank"].default
    routing: str = vocabulary.INIT[
        "routing"
    ].default  # soft: softmax(cos / routing_temperature) over anchors; hard: top-1
    routing_temperature: float = DEFAULT_ROUTING_TEMPERATURE
    # Does the shared mapper train with every expert ("always") or only with the first ("first":
    # later tasks train their own expert only, as HiDe-LLaVA trains LoRA experts on a frozen base)?
    expert_shared_mapper: str = vocabulary.INIT["expert_shared_mapper"].default
    learner: str = "gradient"
    analytic_dim: int = DEFAULT_DIM  # M: width of the random ReLU projection
    analytic_seed: int = 0  # the projection is rebuilt from this seed (cvm_edge.analytic.projection)
    # whitened: ridge onto the rows of the whitened concept table (the measured best, bench/BENCHMARKS.md);
    # concepts: onto the raw rows; onehot: RanPAC's targets.
    analytic_targets: str = vocabulary.INIT["targets"].default

    def __post_init__(self) -> None:
        if self.train_backbone not in TRAIN_BACKBONE_CHOICES:
            raise ValueError(f"train_backbone must be one of {TRAIN_BACKBONE_CHOICES}")
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"head must be one of {HEAD_CHOICES}")
        if self.mapper_hidden < 0:
            raise ValueError("mapper_hidden must be >= 0")
        if not self.prototype_temperature > 0:
            raise ValueError("prototype_temperature must be > 0")
        if self.experts not in EXPERT_CHOICES:
            raise ValueError(f"experts must be one of {EXPERT_CHOICES}")
        if self.routing not in ROUTING_CHOICES:
            raise ValueError(f"routing must be one of {ROUTING_CHOICES}")
        if self.expert_rank < 1 or not self.routing_temperature > 0:
            raise ValueError("expert_rank must be >= 1 and routing_temperature > 0")
        if self.expert_shared_mapper not in SHARED_MAPPER_CHOICES:
            raise ValueError(f"expert_shared_mapper must be one of {SHARED_MAPPER_CHOICES}")
        if self.experts != "none" and self.head != "concepts":
            raise ValueError("experts sit on the concept head's mapper; the linear head has none")
        if self.learner not in LEARNER_CHOICES:
            raise ValueError(f"learner must be one of {LEARNER_CHOICES}")
        if self.learner == "analytic":
            if self.analytic_targets not in TARGETS:
                raise ValueError(f"analytic targets must be one of {TARGETS}")
            if self.analytic_dim < 1:
                raise ValueError("the analytic projection dimension must be >= 1")
            if self.train_backbone != "none":
                raise ValueError("the analytic learner needs a frozen backbone (--train-backbone none)")
            if self.experts != "none" or self.head != "concepts":
                raise ValueError("the analytic learner has its own head: no experts, no linear head")

    @property
    def analytic(self) -> bool:
        return self.learner == "analytic"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.experts == "none":
            for k in EXPERT_FIELDS:
                d.pop(k)
        if self.learner == "gradient":
            for k in ANALYTIC_FIELDS:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class Mapper(nn.Module):
    """Backbone features -> concept space. Two layers by default; ``hidden=0`` is linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class ConceptHead(nn.Module):
    """Mapper plus a fixed concept table.

    ``table`` is :meth:`cvm_edge.concepts.ConceptTable.as_float32`: ``[C, D]`` (one prototype per
    class: ``logits = scale * z @ table.T``, today's head, bit for bit) or ``[C, P, D]`` with
    all-zero padding rows (several prototypes: see :meth:`class_scores`)."""

    def __init__(
        self,
        feat_dim: int,
        table: np.ndarray,
        hidden: int,
        init_logit_scale: float,
        prototype_temperature: float = DEFAULT_PROTOTYPE_TEMPERATURE,
        experts: ExpertMixture | None = None,
        mapper: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.mapper = mapper if mapper is not None else Mapper(feat_dim, table.shape[-1], hidden)
        # Registered only when on: a model without experts has exactly today's state dict.
        self.experts = experts
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.prototype_temperature = float(prototype_temperature)
        # The table is data, not a parameter: it is stored in concepts.npz beside the weights, so
        # none of these buffers is persistent (checkpoints of single-prototype stores are unchanged).
        self.table: torch.Tensor
        self.prototype_mask: torch.Tensor  # bool [C, P]: which padded slots are real prototypes
        self.log_counts: torch.Tensor  # float [C]: log of each class's prototype count
        self.register_buffer("table", torch.zeros(0), persistent=False)
        self.register_buffer("prototype_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.register_buffer("log_counts", torch.zeros(0), persistent=False)
        self.set_table(table)

    @property
    def multi_prototype(self) -> bool:
        return self.table.dim() == 3

    def embed(self, f: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """The unit embedding of features ``f``; with experts, mixed by anchor routing, or by
        ``experts`` (one expert index per sample: the oracle routing of training)."""
        m = self.mapper(f)
        if self.experts is not None and len(self.experts):
            m = m + self.experts(f, experts)
        return F.normalize(m, dim=-1)

    def class_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Per-class score in cosine units: ``T * log(mean_p exp(s_p / T))`` over the class's
        prototype cosines ``s_p``, i.e. the temperature-scaled LogSumExp ``T * logsumexp(s / T)``
        minus ``T * log(P_c)``.

        The ``- T log P_c`` term makes a class score independent of how many prototypes it has
        (one prototype gives exactly its cosine; ``P`` identical ones give that cosine too);
        without it a class with five descriptions would out-score a single-row class by up to
        ``T log 5`` for no visual reason. Computed with the max subtracted (stable, and exact for
        single-prototype classes). Padding takes no part: its cosine is replaced by
        :data:`PAD_COSINE` (below any real cosine, so never the max) and its exp term is multiplied
        by 0. Every intermediate stays finite (no ``-inf`` masks): int8 calibration measures the
        range of every tensor in the graph and fails on an infinite one. Dense, fixed shapes only,
        so the graph exports to ONNX as MatMul/Reshape/Where/ReduceMax/Exp/Mul/ReduceSum/Log."""
        c, p, d = self.table.shape
        s = (z @ self.table.reshape(c * p, d).t()).reshape(-1, c, p)
        s = s.masked_fill(~self.prototype_mask, PAD_COSINE)
        # The gradient of T*logsumexp does not depend on the shift, so the max is a constant here.
        m = s.amax(dim=-1, keepdim=True).detach()
        t = self.prototype_temperature
        e = torch.exp((s - m) / t) * self.prototype_mask.to(s.dtype)  # in [0, 1]; the max term is exactly 1
        return m.squeeze(-1) + t * (torch.log(e.sum(dim=-1)) - self.log_counts)

    def cosines(self, z: torch.Tensor) -> torch.Tensor:
        """Each class's score in cosine units, before the logit scale (``[B, C]``, at most 1): the
        cosine to its row, or with several prototypes :meth:`class_scores`, which stays below 1 by
        up to ``T log P`` even on a prototype."""
        return z @ self.table.t() if not self.multi_prototype else self.class_scores(z)

    def logits_from_embedding(self, z: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        if not self.multi_prototype:
            # (scale * z) @ table.T, not scale * cosines(z): the op order of single-prototype stores'
            # logits and ONNX graphs stays as it was (the class docstring's "bit for bit").
            return scale * z @ self.table.t()
        return scale * self.class_scores(z)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embedding(self.embed(f))

    def set_table(self, table: np.ndarray) -> None:
        arr = np.asarray(table, dtype=np.float32)
        if arr.ndim not in (2, 3):
            raise ValueError(f"a concept table is [C, D] or [C, P, D], got shape {arr.shape}")
        device = self.logit_scale.device
        self.table = torch.from_numpy(arr).to(device)
        if arr.ndim == 3:
            mask = np.any(arr != 0, axis=-1)
            if not mask.any(axis=1).all():
                raise ValueError("every class needs at least one non-zero prototype row")
            self.prototype_mask = torch.from_numpy(mask).to(device)
            self.log_counts = torch.from_numpy(np.log(mask.sum(axis=1)).astype(np.float32)).to(device)
        else:
            self.prototype_mask = torch.ones((arr.shape[0], 1), dtype=torch.bool, device=device)
            self.log_counts = torch.zeros(arr.shape[0], device=device)


class AnalyticMapper(nn.Module):
    """``relu(f @ P) @ W``: the fixed seeded projection ``P`` (rebuilt from the seed, not stored) and
    the ridge solution ``W`` (cvm_edge.analytic), which is set, never trained."""

    def __init__(self, in_dim: int, dim: int, out_dim: int, seed: int) -> None:
        super().__init__()
        self.projection: torch.Tensor
        self.weight: torch.Tensor
        self.register_buffer("projection", torch.from_numpy(projection(in_dim, dim, seed)), persistent=False)
        self.register_buffer("weight", torch.zeros(dim, out_dim))

    def lift(self, f: torch.Tensor) -> torch.Tensor:
        return torch.relu(f @ self.projection)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.lift(f) @ self.weight

    def set_weight(self, w: np.ndarray) -> None:
        arr = torch.from_numpy(np.asarray(w, np.float32)).to(self.weight.device)
        if arr.shape[0] != self.weight.shape[0]:
            raise ValueError(
                f"a ridge solution of {arr.shape[0]} rows does not fit a projection of {self.weight.shape[0]}"
            )
        self.weight = arr


class RidgeHead(nn.Module):
    """One-hot ridge targets (RanPAC): logits are ``scale * relu(f @ P) @ W``, one column per table
    row (rows without images stay 0); ``embed`` is the raw ridge output."""

    def __init__(self, feat_dim: int, dim: int, rows: int, seed: int, init_logit_scale: float) -> None:
        super().__init__()
        self.mapper = AnalyticMapper(feat_dim, dim, rows, seed)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=False)

    def embed(self, f: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        return self.mapper(f)

    def logits_from_embedding(self, z: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * z

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embedding(self.embed(f))

    def set_table(self, table: np.ndarray) -> None:
        n, have = table.shape[0], self.mapper.weight.shape[1]
        if n < have:
            raise ValueError("a concept table never shrinks")
        if n > have:
            w = self.mapper.weight
            self.mapper.weight = torch.cat([w, w.new_zeros(w.shape[0], n - have)], dim=1)


class LinearHead(nn.Module):
    """A learned classifier with one output per table row (baselines; ``embed`` is the features)."""

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def embed(self, f: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        return f

    def logits_from_embedding(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def set_table(self, table: np.ndarray) -> None:
        n = table.shape[0]
        old = self.fc
        if n == old.out_features:
            return
        if n < old.out_features:
            raise ValueError("a concept table never shrinks")
        new = nn.Linear(old.in_features, n).to(old.weight.device)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.fc = new


class CvmModel(nn.Module):
    def __init__(self, config: ModelConfig, table: np.ndarray, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = (
            backbone if backbone is not None else create_backbone(config.backbone, image_size=config.image_size)
        )
        dim = feature_dim(self.backbone)
        self.head: ConceptHead | LinearHead | RidgeHead
        if config.analytic and config.analytic_targets == "onehot":
            self.head = RidgeHead(
                dim, config.analytic_dim, table.shape[0], config.analytic_seed, config.init_logit_scale
            )
        elif config.analytic:
            mapper = AnalyticMapper(dim, config.analytic_dim, table.shape[-1], config.analytic_seed)
            self.head = ConceptHead(dim, table, 0, config.init_logit_scale, config.prototype_temperature, mapper=mapper)
            self.head.logit_scale.requires_grad_(False)
        elif config.head == "concepts":
            experts = None
            if config.experts != "none":
                experts = ExpertMixture(
                    dim, table.shape[-1], config.expert_rank, config.routing, config.routing_temperature
                )
            self.head = ConceptHead(
                dim, table, config.mapper_hidden, config.init_logit_scale, config.prototype_temperature, experts
            )
        else:
            self.head = LinearHead(dim, table.shape[0])
        self.trainable_backbone = set_trainable(self.backbone, config.train_backbone)

    @property
    def backbone_frozen(self) -> bool:
        return not self.trainable_backbone

    @property
    def table_rows(self) -> int:
        """Logit width: the head's rows (concept-table classes, or linear outputs)."""
        head = self.head
        if isinstance(head, RidgeHead):
            return int(head.mapper.weight.shape[1])
        return int(head.table.shape[0]) if isinstance(head, ConceptHead) else int(head.fc.out_features)

    @property
    def experts(self) -> ExpertMixture | None:
        """The per-task experts, or None for a model configured without them."""
        return self.head.experts if isinstance(self.head, ConceptHead) else None

    def add_expert(self, classes: Sequence[int]) -> int:
        """A new expert for an experience over ``classes``; earlier experts are frozen, and the
        shared mapper trains per ``config.expert_shared_mapper``. Returns the expert's index."""
        if self.experts is None or not isinstance(self.head, ConceptHead):
            raise ValueError("this model has no experts (ModelConfig.experts is 'none')")
        index = self.experts.add_expert(classes)
        self.head.mapper.requires_grad_(index == 0 or self.config.expert_shared_mapper == "always")
        return index

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over all table rows, embedding) from one backbone pass (the export graph's outputs)."""
        z = self.head.embed(self.features(x))
        return self.head.logits_from_embedding(z), z

    def _head_table(self, table: np.ndarray) -> np.ndarray:
        """The rows the head scores against: the concept table, or for whitened analytic targets the
        whitened table (cvm_edge.analytic.whiten_table, recomputed whenever the table changes)."""
        if self.config.analytic and self.config.analytic_targets == "whitened":
            return whiten_table(table)
        return table

    def set_table(self, table: np.ndarray) -> None:
        self.head.set_table(self._head_table(table))

    def train(self, mode: bool = True) -> CvmModel:
        super().train(mode)
        if mode and self.backbone_frozen:
            # A frozen backbone keeps its BatchNorm statistics: they are part of what is frozen.
            self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def weights_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the model, except the table (stored separately)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}


def build_model(config: ModelConfig, table: np.ndarray, pretrained_backbone: nn.Module | None = None) -> CvmModel:
    return CvmModel(config, table, backbone=pretrained_backbone)


class FeatureInput(nn.Module):
    """Stands in for a frozen backbone whose graph runs elsewhere (the store's backbone graph in
    onnxruntime, cvm_edge.backbone_graph): the model's input is then the backbone's features, and it holds no timm module."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head_hidden_size = width  # what backbones.feature_dim reads

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f


def build_head_model(config: ModelConfig, table: np.ndarray, feature_width: int) -> CvmModel:
    """The model of a frozen-backbone store without its backbone: features in, logits out."""
    if config.train_backbone != "none":
        raise ValueError("only a frozen backbone can run outside the model")
    return CvmModel(config, table, backbone=FeatureInput(feature_width))
