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


@pytest.mark.parametrize(("choice", "dtype"), [("uint8", "UINT8"), ("int8", "INT8")])
def test_int8_weights_are_the_kind_asked_for_per_channel(
    onnx_bytes: bytes, tmp_path: Path, choice: str, dtype: str
) -> None:
    """uint8 weights (U8U8) do not saturate on x86 CPUs without VNNI; int8 weights (U8S8) run the
    fast kernels of VNNI and ARM CPUs (deploy/cpu.py): each is what the export writes when asked."""
    import onnx
    from onnx import TensorProto, numpy_helper

    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    model = onnx.load_from_string(to_int8(onnx_bytes, x, "minmax", tmp_path, choice))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    conv_weight = next(n for n in model.graph.node if n.op_type == "Conv").input[1]
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv_weight)
    weights = next(i for i in model.graph.initializer if i.name == dq.input[0])
    assert weights.data_type == getattr(TensorProto, dtype)
    assert inits[dq.input[0]].ndim == 4 and inits[dq.input[1]].shape == (4,)  # per output channel
    quantized_activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantized_activations
    assert all(inits[n.input[2]].dtype == np.uint8 for n in quantized_activations)
