"""Online EWC's Fisher estimate (cvm_edge.plugins.ewc): our own arithmetic, on a tiny linear model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvm_edge.data import ImageSet
from cvm_edge.plugins import EwcPlugin
from cvm_edge.preprocess import Preprocessing


def test_fisher_weights_each_squared_gradient_by_the_label_probability() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prep = Preprocessing(image_size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    data = ImageSet(
        pixels=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 3, 0, 1, 3], np.int64)
    )
    seen = torch.tensor([0, 1, 3])  # row 2 is not seen: the likelihood is over seen rows only
    ctx = SimpleNamespace(
        model=model,
        new_data=data,
        rng=np.random.default_rng(1),
        device=torch.device("cpu"),
        prep=prep,
        cached=False,
        seen=seen,
        forward_head=lambda m, x: (None, m(x)),
    )
    plugin = EwcPlugin(lam=1.0, samples=len(data))
    plugin.after_experience(ctx)  # type: ignore[arg-type]

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    x = ((torch.from_numpy(data.pixels).permute(0, 3, 1, 2).float() / 255.0) - 0.5) / 0.5
    for i in range(len(data)):
        logits = model(x[i : i + 1]).index_select(1, seen)
        target = torch.searchsorted(seen, torch.from_numpy(data.labels[i : i + 1]))
        loss = F.cross_entropy(logits, target)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads, strict=True):
            expected[n] += float(torch.exp(-loss.detach())) * g**2 / len(data)
    for n, f in plugin.fisher.items():
        torch.testing.assert_close(f, expected[n], rtol=1e-4, atol=1e-9)
    assert all(float(f.sum()) > 0 for f in plugin.fisher.values())
