from __future__ import annotations

import numpy as np
import pytest
import torch

from cvm_edge.backbones import count_parameters, create_backbone, set_trainable
from cvm_edge.model import CvmModel, ModelConfig


def test_reduced_resnet18_matches_the_literature() -> None:
    m = create_backbone("resnet18_cifar")
    assert 11.0e6 < count_parameters(m) < 11.3e6
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize("name, prefix", [("resnet10_cifar_slim", "layer4"), ("efficientnet_lite0", "blocks.6")])
def test_train_backbone_modes(name: str, prefix: str) -> None:
    m = create_backbone(name)
    names = set_trainable(m, "last")
    assert names and names[0].startswith(prefix)
    assert all(not p.requires_grad for n, p in m.named_parameters() if n not in names)
    assert set_trainable(m, "none") == []
    assert len(set_trainable(m, "all")) == len(list(m.parameters()))


def test_concept_head_logits_are_scaled_cosines() -> None:
    table = np.eye(4, 8, dtype=np.float32)
    model = CvmModel(ModelConfig("resnet10_cifar_slim", 32, train_backbone="none"), table).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z = model.embed(x)
        logits = model(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    scale = model.head.logit_scale.exp()
    assert torch.allclose(logits, scale * z @ torch.from_numpy(table).T, atol=1e-5)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.head.table.requires_grad is False
