"""int8 calibration of an activation whose range is too small to histogram (random-init GhostNet,
LCNet and EfficientViT have one): a clear refusal naming the way out, not a quantiser traceback."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.export import ExportGateError, to_int8


class TinyRange(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiny = (torch.relu(self.conv(x)) * 1e-44).mean((2, 3))  # a denormal range
        z = self.fc(tiny) + self.conv(x).mean((2, 3))[:, :2]
        return 2 * z, z


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    buf = io.BytesIO()
    torch.manual_seed(0)
    torch.onnx.export(
        TinyRange().eval(),
        (torch.zeros(1, 3, 8, 8),),
        buf,
        input_names=["input"],
        output_names=["logits", "embedding"],
        dynamic_axes={"input": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return buf.getvalue()


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_of_a_tiny_range_is_refused_by_name(
    onnx_bytes: bytes, method: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ExportGateError, match=rf"int8 calibration by {method} failed: .*`--calibration minmax`"):
        to_int8(onnx_bytes, x, method, tmp_path)
    assert to_int8(onnx_bytes, x, "minmax", tmp_path)  # the way out the message names works
