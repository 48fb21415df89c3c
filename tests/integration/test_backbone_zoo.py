"""The edge backbone zoo: every listed timm model gives the head the feature width it really
outputs, runs at a small size, exports to ONNX with parity; two go through the whole CLI chain.
The full chain over every backbone (fp32, fp16 and int8 gates, the served bundle) is
``python -m bench.zoo``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from cvm_edge.backbones import EDGE_ZOO, check_image_size, create_backbone, feature_dim
from cvm_edge.errors import UsageError
from cvm_edge.model import CvmModel, ModelConfig
from deploy.export import ExportGraph, export_fp32, image_example, onnx_outputs, torch_outputs

SIZE = 32
# Models with a 1x1 head conv after pooling: timm's num_features is the width before it.
HEAD_CONV = {
    "mobilenetv3_small_100": (576, 1024),
    "mobilenetv3_large_100": (960, 1280),
    "mobilenetv4_conv_small": (960, 1280),
    "ghostnet_100": (960, 1280),
    "lcnet_050": (256, 1280),
    "efficientvit_b0": (128, 1280),
}


@pytest.mark.parametrize("name", sorted(HEAD_CONV))
def test_feature_dim_is_the_head_conv_width_not_num_features(name: str) -> None:
    m = create_backbone(name)
    before, after = HEAD_CONV[name]
    assert m.num_features == before  # what feature_dim used to read
    assert feature_dim(m) == after


@pytest.mark.parametrize("name", EDGE_ZOO)
def test_zoo_backbone_forward_and_onnx_export(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CvmModel(ModelConfig(name, SIZE), np.eye(3, 16, dtype=np.float32)).eval()
    check_image_size(model.backbone, name, SIZE)
    graph = ExportGraph(model, (0, 1, 2)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    ref = torch_outputs(graph, x, 2)
    assert ref[0].shape == (2, 3) and ref[1].shape == (2, 16)
    onnx_bytes, _ = export_fp32(graph, image_example(SIZE), 18, tmp_path)
    got = onnx_outputs(onnx_bytes, x, 2)
    assert np.abs(ref[1] - got[1]).max() <= 1e-4
    assert (ref[0].argmax(1) == got[0].argmax(1)).all()


def test_fixed_size_model_is_built_for_the_asked_size() -> None:
    # ViT's position embedding is sized at construction: the model gets timm's img_size.
    m = create_backbone("vit_tiny_patch16_224", image_size=64)
    check_image_size(m, "vit_tiny_patch16_224", 64)
    assert create_backbone("resnet18", image_size=64).default_cfg["input_size"] == (3, 224, 224)


def test_unsupported_size_is_a_usage_error_naming_the_sizes_that_work() -> None:
    m = create_backbone("efficientformer_l1", image_size=64)  # takes no img_size: 224 px only
    with pytest.raises(UsageError, match=r"does not run at --image-size 64 .*sizes that work: 224$"):
        check_image_size(m, "efficientformer_l1", 64)


def test_cvm_init_refuses_an_unsupported_size_before_writing(
    fashion_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wd = tmp_path / "w"
    argv = ["init", "--workdir", str(wd), "--concepts", str(fashion_table), "--pretrained", "none"]
    assert run_cli(*argv, "--backbone", "efficientformer_l1", "--image-size", "64") == 2
    err = capsys.readouterr().err
    assert "efficientformer_l1" in err and "sizes that work: 224" in err and "Traceback" not in err
    assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())


@pytest.mark.parametrize(("name", "size"), [("mobilenetv3_small_100", 64), ("vit_tiny_patch16_224", 32)])
def test_cli_chain_init_update_export_predict(
    name: str, size: int, fashion_table: Path, class_folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's reproduction (mobilenetv3_small_100 at 64 px ended in a shape error in the
    mapper) and a fixed-size model at a size other than its own."""
    wd = tmp_path / "w"
    data = class_folders([0, 1], per_class=24)
    init = ["init", "--workdir", str(wd), "--concepts", str(fashion_table), "--pretrained", "none"]
    assert run_cli("-q", *init, "--backbone", name, "--image-size", str(size)) == 0
    upd = ["update", "--workdir", str(wd), "--data", str(data), "--no-progress", "--epochs", "1"]
    assert run_cli("-q", *upd) == 0  # exports and publishes the fp32 bundle (its gate passed)
    manifest = json.loads((wd / "bundles" / "v000002" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["image_size"] == size
    image = next((data / "trouser").iterdir())
    capsys.readouterr()
    assert run_cli("predict", "--workdir", str(wd), str(image), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert {p["label"] for p in out["results"][0]["predictions"]} == {"T-shirt/top", "Trouser"}
