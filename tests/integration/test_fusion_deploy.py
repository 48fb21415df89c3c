"""Fusion end to end on the product path: `cvm update --plugins fusion` three times, the unified
bundle it publishes, `cvm export --experimental --fusion-routing top-k` through the fp32 parity gate, and a real
`cvm serve` process (uvicorn) answering with the routed bundle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from deploy_helpers import generated_images, update, write_folders

from bench.reliability.common import running_server
from conftest import FASHION_NAMES, init_store, run_cli
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.errors import UsageError
from cvm_edge.lab.fusion_state import FusionState
from cvm_edge.lab.routing import FusedRoutedModel
from cvm_edge.loading import model_from_checkpoint
from cvm_edge.preprocess import load_pixels, normalise
from deploy import export as export_mod
from deploy.bundle import current_bundle_dir, load_bundle
from deploy.predictor import Predictor, PredictorOptions

TASKS = ([0, 1], [2, 3], [4, 5])
CLASSES = [FASHION_NAMES[c] for t in TASKS for c in t]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    base = tmp_path_factory.mktemp("fusion-store")
    wd = base / "w"
    init_store(wd, fashion_table)
    for t, classes in enumerate(TASKS):
        data = write_folders(base / f"d{t}", classes, 20)
        extra = ("--experimental", "--plugins", "fusion", "--epochs", "1", "--force", "--balance-epochs", "0")
        assert update(wd, data, *extra) == 0
    return wd


@pytest.fixture(scope="module")
def routed_bundle(store: Path) -> Path:
    assert (
        run_cli("-q", "export", "--workdir", str(store), "--experimental", "--fusion-routing", "top-k", "--top-k", "2")
        == 0
    )
    bundle = current_bundle_dir(store)
    assert bundle is not None and bundle.name == "v000004.2"  # next to the unified v000004 of the update
    return bundle


def test_update_publishes_the_unified_model_as_a_plain_bundle(store: Path) -> None:
    ckpt = CheckpointStore(store).load()
    state = FusionState.from_tensors(ckpt.plugin_state["fusion"])
    assert ckpt.version == 4 and state.n_tasks == 3 and state.task_classes == tuple(tuple(t) for t in TASKS)
    unified = state.unified_params()
    assert all(torch.equal(ckpt.weights[k], unified[k]) for k in unified)  # the checkpoint is the unified model
    m = load_bundle(store / "bundles" / "v000004").manifest
    assert "routing" not in m and m["parity"]["passed"] and m["classes"] == CLASSES


def test_routed_export_passes_the_fp32_gate_and_matches_torch(store: Path, routed_bundle: Path) -> None:
    m = load_bundle(routed_bundle).manifest
    assert m["precision"] == "fp32" and m["classes"] == CLASSES
    p = m["parity"]
    assert p["passed"] and p["n_images"] >= 64
    assert p["max_abs_embedding_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    r = m["routing"]
    assert r["kind"] == "top-k" and r["k"] == 2 and r["tasks"] == 3
    assert r["task_classes"] == [[FASHION_NAMES[c] for c in t] for t in TASKS]
    assert r["fusion_bytes"]["total"] > r["fusion_bytes"]["unified"] > r["fusion_bytes"]["masks"] > 0
    # the routed graph is T + 1 models: bigger than the unified bundle's one model
    unified_size = (store / "bundles" / "v000004" / "model.onnx").stat().st_size
    assert (routed_bundle / "model.onnx").stat().st_size > 3 * unified_size
    # onnxruntime gives what the torch routed model gives, and it differs from the unified model
    ckpt = CheckpointStore(store).load()
    routed = FusedRoutedModel(model_from_checkpoint(ckpt), FusionState.from_tensors(ckpt.plugin_state["fusion"]), 2)
    x = normalise(ckpt.val.pixels, ckpt.prep)
    with torch.no_grad():
        expected = routed(torch.from_numpy(x)).numpy()[:, list(ckpt.seen)]
    got = Predictor(routed_bundle, PredictorOptions(intra_op_threads=1)).run(x).logits
    assert np.abs(got - expected).max() < 1e-4
    plain = Predictor(store / "bundles" / "v000004", PredictorOptions(intra_op_threads=1)).run(x).logits
    assert np.abs(got - plain).max() > 0.1


def test_routing_needs_a_fused_store_and_fp32(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = CheckpointStore(store).load()
    with pytest.raises(UsageError, match="--plugins fusion"):
        export_mod.routed_model(
            dataclasses.replace(ckpt, plugin_state={}), model_from_checkpoint(ckpt), export_mod.ExportOptions()
        )
    assert (
        run_cli("export", "--workdir", str(store), "--experimental", "--fusion-routing", "top-k", "--precision", "int8")
        == 2
    )
    assert "fp32 only" in capsys.readouterr().err


def test_cvm_serve_answers_with_the_routed_bundle(routed_bundle: Path, tmp_path: Path) -> None:
    reference = Predictor(routed_bundle, PredictorOptions(intra_op_threads=1))
    images = {n: d for n, (d, _) in generated_images().items() if n in ("rgb.jpg", "rgb.png", "gray.png")}
    sample = next((write_folders(tmp_path / "s", [3], 1) / "dress").iterdir())
    images["dress.png"] = sample.read_bytes()
    args = ["--bundle", str(routed_bundle), "--threads", "1"]
    with running_server(args, tmp_path / "server.log") as server, httpx.Client(base_url=server.url, timeout=30) as c:
        info = c.get("/v1/model").json()
        assert info["model_version"] == "v000004.2" and info["manifest"]["routing"]["kind"] == "top-k"
        for name, data in images.items():
            r = c.post("/v1/classify?top_k=3", content=data)
            assert r.status_code == 200, (name, r.text)
            preds = r.json()["predictions"]
            assert len(preds) == 3 and {p["label"] for p in preds} <= set(CLASSES)
            expected = reference.classify([data], 3)[0]
            assert [p["label"] for p in preds] == [p["label"] for p in expected], name
            assert np.allclose([p["score"] for p in preds], [p["score"] for p in expected], atol=1e-5)
        # the v2 protocol returns the routed logits for a normalised tensor too
        x = normalise(load_pixels(images["dress.png"], reference.prep)[None], reference.prep)
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = c.post("/v2/models/cvm/infer", content=json.dumps(body))
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        logits = np.asarray(out["logits"]["data"], np.float32)
        assert np.abs(logits - reference.run(x).logits[0]).max() < 1e-4
