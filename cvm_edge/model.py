"""CvmModel: a timm backbone, a Mapper into the concept space, and a head.

``head="concepts"``: ``logits = exp(logit_scale) * normalise(mapper(f)) @ table.T`` with a fixed
table (a buffer, never trained): adding a class adds a row, the head never changes shape.
``head="linear"``: an ordinary learned classifier over the same class rows, for baselines.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvm_edge.backbones import TRAIN_BACKBONE_CHOICES, create_backbone, feature_dim, set_trainable

HEAD_CHOICES = ("concepts", "linear")
MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str
    image_size: int
    train_backbone: str = "all"
    head: str = "concepts"
    mapper_hidden: int = 512  # 0 gives a linear mapper
    init_logit_scale: float = math.log(16.0)
    pretrained: str = "none"  # none | offline | hub | a local checkpoint path

    def __post_init__(self) -> None:
        if self.train_backbone not in TRAIN_BACKBONE_CHOICES:
            raise ValueError(f"train_backbone must be one of {TRAIN_BACKBONE_CHOICES}")
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"head must be one of {HEAD_CHOICES}")
        if self.mapper_hidden < 0:
            raise ValueError("mapper_hidden must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    def __init__(self, feat_dim: int, table: np.ndarray, hidden: int, init_logit_scale: float) -> None:
        super().__init__()
        self.mapper = Mapper(feat_dim, table.shape[1], hidden)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # The table is data, not a parameter: it is stored in concepts.npz beside the weights.
        self.table: torch.Tensor
        self.register_buffer("table", torch.from_numpy(np.asarray(table, dtype=np.float32)), persistent=False)

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mapper(f), dim=-1)

    def logits_from_embedding(self, z: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return scale * z @ self.table.t()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embedding(self.embed(f))

    def set_table(self, table: np.ndarray) -> None:
        self.table = torch.from_numpy(np.asarray(table, dtype=np.float32)).to(self.logit_scale.device)


class LinearHead(nn.Module):
    """A learned classifier with one output per table row (baselines; ``embed`` is the features)."""

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def embed(self, f: torch.Tensor) -> torch.Tensor:
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
        self.backbone = backbone if backbone is not None else create_backbone(config.backbone)
        dim = feature_dim(self.backbone)
        self.head: ConceptHead | LinearHead
        if config.head == "concepts":
            self.head = ConceptHead(dim, table, config.mapper_hidden, config.init_logit_scale)
        else:
            self.head = LinearHead(dim, table.shape[0])
        self.trainable_backbone = set_trainable(self.backbone, config.train_backbone)

    @property
    def backbone_frozen(self) -> bool:
        return not self.trainable_backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_table(self, table: np.ndarray) -> None:
        self.head.set_table(table)

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
