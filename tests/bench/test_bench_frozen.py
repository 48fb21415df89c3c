"""bench.frozen through bench.run on real images (the embedded Fashion-MNIST sample, offline Lite0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import run as bench_run
from cvm_edge.pretrained import offline_weights_available

pytestmark = pytest.mark.skipif(not offline_weights_available(), reason="offline Lite0 weights not installed")


def test_frozen_methods_on_real_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path / "cache"))
    methods = "ncm,ranpac,cvm-analytic-whitened,joint-probe"
    args = ["--protocol", "fmnist-5-lite0", "--demo", "--method", methods, "--image-size", "32"]
    args += ["--train-per-class", "40", "--test-per-class", "20", "--out", str(tmp_path / "res")]
    args += ["--hp", "analytic_dim=256", "--tag=-t"]  # a small projection: the test's ridge solves stay quick
    assert bench_run.main(args) == 0
    res = {
        p.stem.split("-t-b0")[0]: json.loads(p.read_text())
        for p in (tmp_path / "res" / "fmnist-5-lite0").glob("*.json")
    }
    assert set(res) == set(methods.split(","))
    # the features were computed once and read from the cache by the next three methods
    assert not res["ncm"]["features_cached"] and all(res[m]["features_cached"] for m in methods.split(",")[1:])
    cvm = res["cvm-analytic-whitened"]
    assert len(cvm["acc_matrix"]) == 5 and cvm["stored_bytes"]["images"] == 0
    assert all(p["relative_lambda"] > 0 and p["lambda_scores"] for p in cvm["per_task"])
    # open set: two classes no task trained; their zero-shot top-1 among all classes and the AUROC are measured
    held = cvm["open_set"]["held_out_classes"]
    assert len(held) == 2 and 0.0 <= cvm["open_set"]["zero_shot_top1"] <= 100.0
    assert 0.5 < cvm["open_set"]["unknown_auroc"] <= 1.0  # best-cosine separates seen from never-seen above chance
    assert "zero_shot_top1" not in res["ranpac"]["open_set"]  # a one-hot head has no row for an unseen class
    probe = res["joint-probe"]
    assert len(probe["acc_matrix"]) == 1 and len(probe["acc_matrix"][0]) == 5  # one row: trained on all tasks at once
    assert cvm["hyperparameters"]["analytic_dim"] == 256


def test_a_class_added_by_name_is_scored_and_can_win(fashion_table: Path) -> None:
    """The zero-shot path: a table row that no image trained still gets a class score, and an embedding
    on its (whitened) row predicts it among every class."""
    import torch

    from cvm_edge import analytic_learner as al
    from cvm_edge.analytic import class_targets
    from cvm_edge.concepts import ConceptTable
    from cvm_edge.model import ModelConfig, build_model

    table = ConceptTable.load(fashion_table).as_float32()
    config = ModelConfig("resnet10_cifar_slim", 32, train_backbone="none", learner="analytic", analytic_dim=16)
    torch.manual_seed(0)
    model = build_model(config, table)
    targets = class_targets(table, "whitened")
    pred = al.rows_from_outputs(model, targets[[8, 9]], list(range(10)))
    np.testing.assert_array_equal(pred, [8, 9])  # Bag and Ankle boot, never trained, predicted from their rows
