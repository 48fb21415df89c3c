"""An analytic store keeps its frozen backbone as an ONNX graph: updates and exports build no timm module."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli, sample_pixels
from cvm_edge.augment import to_input
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.data import load_image_folder
from cvm_edge.loading import model_from_checkpoint
from cvm_edge.preprocess import normalise
from cvm_edge.pretrained import offline_weights_available
from cvm_edge.workdir import layout
from deploy.export import ON_DEVICE, export_bundle

pytestmark = pytest.mark.skipif(not offline_weights_available(), reason="offline Lite0 weights not installed")


def _init(workdir: Path, table: Path) -> None:
    args = ["-q", "init", "--workdir", str(workdir), "--concepts", str(table), "--image-size", "32"]
    assert run_cli(*args, "--analytic-dim", "256") == 0


def _learned(tmp_path: Path, table: Path, class_folders, classes: list[int], *extra: str) -> tuple[Path, Path]:
    """A store made by `cvm init` that learnt ``classes`` (30 images each) in one `cvm update`; (store, data)."""
    w = tmp_path / "w"
    _init(w, table)
    data = class_folders(classes, per_class=30)
    assert run_cli("-q", "update", "--workdir", str(w), "--data", str(data), "--no-progress", *extra) == 0
    return w, data


def _graphs(workdir: Path) -> list[Path]:
    return sorted(layout(workdir).graphs.glob("*.onnx"))


def _update_in_a_process(workdir: Path, data: Path, *extra: str) -> tuple[int, bool]:
    """``cvm update`` in its own interpreter: its exit code, and whether it imported timm or torchvision."""
    code = (
        "import sys; from cvm_edge.cli import main; "
        f"rc = main(['-q', 'update', '--workdir', {str(workdir)!r}, '--data', {str(data)!r}, '--no-progress', "
        f"*{list(extra)!r}]); "
        "print('IMPORTED', any(m in sys.modules for m in ('timm', 'torchvision'))); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=os.environ)
    assert "IMPORTED" in proc.stdout, proc.stderr[-2000:]
    return proc.returncode, "IMPORTED True" in proc.stdout


def test_an_update_and_its_export_run_the_stores_graph_without_timm_and_learn_what_the_timm_path_learns(
    fashion_table: Path, class_folders, tmp_path: Path, caplog, capsys
) -> None:
    graph_store, torch_store = tmp_path / "g", tmp_path / "t"
    _init(graph_store, fashion_table)
    (graph,) = _graphs(graph_store)  # made and checked by `cvm init`, named by its sha256
    assert run_cli("status", "--workdir", str(graph_store)) == 0
    assert f"backbone graph {graph.name[:12]} ({graph.stat().st_size / 1e6:.1f} MB" in capsys.readouterr().out
    meta = json.loads((graph_store / "checkpoints" / "v000001" / "meta.json").read_text())
    assert graph.name == f"{meta['backbone_graph']}.onnx"
    shutil.copytree(graph_store, torch_store)
    graph.with_name("x").write_bytes(b"")  # an unrelated file in the folder changes nothing
    (_graphs(torch_store)[0]).unlink()  # this copy has to build the backbone in torch, as stores from before

    data = class_folders([0, 1, 3], per_class=30)
    assert _update_in_a_process(graph_store, data) == (0, False)  # the update and its export: no timm
    with caplog.at_level(logging.WARNING):
        assert run_cli("-q", "update", "--workdir", str(torch_store), "--data", str(data), "--no-progress") == 0
    assert "the backbone runs in torch" in caplog.text  # the missing graph is named, and not needed

    g, t = CheckpointStore(graph_store).load(), CheckpointStore(torch_store).load()
    assert g.analytic is not None and t.analytic is not None
    np.testing.assert_allclose(g.analytic.stats.gram, t.analytic.stats.gram, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g.weights["head.mapper.weight"], t.weights["head.mapper.weight"], rtol=1e-3, atol=1e-4)
    assert g.history[-1]["per_class_accuracy"] == t.history[-1]["per_class_accuracy"]
    # the backbone's torch weights stay in every version (a GPU update, `cvm predict` build from them)
    assert all(torch.equal(g.weights[k], t.weights[k]) for k in t.weights if k.startswith("backbone."))
    # the timm path made the graph again from its real images; both versions name the same bytes
    assert g.backbone_graph is not None and g.backbone_graph == t.backbone_graph
    assert [p.name for p in _graphs(torch_store)] == [graph.name]


def test_a_bundle_composed_from_the_graph_matches_the_whole_torch_model_on_real_images(
    fashion_table: Path, class_folders, tmp_path: Path, sample
) -> None:
    w, data = _learned(tmp_path, fashion_table, class_folders, [2, 5, 9])
    manifest = json.loads((w / "bundles" / "v000002" / "manifest.json").read_text())
    assert "backbone graph" in manifest["exporter"] and manifest["parity"]["passed"]
    ckpt = CheckpointStore(w).load()
    prep = ckpt.prep
    pixels = sample_pixels(sample["test_images"][:48], prep)
    sess = ort.InferenceSession(str(w / "bundles" / "v000002" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"input": normalise(pixels, prep)})
    model = model_from_checkpoint(ckpt)  # the whole model: timm backbone and head, in torch
    with torch.inference_mode():
        ref_logits, ref_emb = model.logits_and_embedding(to_input(torch.from_numpy(pixels), prep))
    ref_logits = ref_logits[:, list(ckpt.seen)].numpy()
    assert np.abs(emb - ref_emb.numpy()).max() < 1e-4
    assert (logits.argmax(1) == ref_logits.argmax(1)).all()
    # `cvm export` (torch.export-based exporter), and an older opset (onnx cannot down-convert every
    # operator), export the whole model through the timm module
    assert run_cli("-q", "export", "--workdir", str(w), "--images", str(data)) == 0
    current = (w / "bundles" / "CURRENT").read_text().strip()
    dynamo = json.loads((w / "bundles" / current / "manifest.json").read_text())
    assert "dynamo" in dynamo["exporter"] and "backbone graph" not in dynamo["exporter"]
    images = load_image_folder(data, ckpt.table, prep)
    old = export_bundle(w, None, dataclasses.replace(ON_DEVICE, opset=17), images).manifest
    assert old["opset"] == 17 and "backbone graph" not in old["exporter"] and old["parity"]["passed"]
    # a newer opset than the graph's: the composed model is up-converted and passes the same gate
    newer = export_bundle(w, None, dataclasses.replace(ON_DEVICE, opset=19), images).manifest
    assert newer["opset"] == 19 and "backbone graph" in newer["exporter"] and newer["parity"]["passed"]


def test_cvm_predict_through_the_graph_gives_what_the_whole_torch_model_gives(
    fashion_table: Path, class_folders, tmp_path: Path, capsys
) -> None:
    w, data = _learned(tmp_path, fashion_table, class_folders, [0, 1, 8], "--no-export")
    images = [str(p) for p in sorted(data.rglob("*.png"))[::9]]
    capsys.readouterr()  # what init and update printed

    def predict() -> list[dict]:
        assert run_cli("predict", "--workdir", str(w), *images, "--json", "--top-k", "3") == 0
        return json.loads(capsys.readouterr().out)["results"]

    graph_run = predict()
    for p in _graphs(w):
        p.unlink()  # the same store without its graph: the timm backbone in torch
    torch_run = predict()
    assert len(graph_run) == len(images) > 5
    for g, t in zip(graph_run, torch_run, strict=True):
        assert [x["label"] for x in g["predictions"]] == [x["label"] for x in t["predictions"]]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(g["predictions"], t["predictions"], strict=True))
        assert g["unknown"] == t["unknown"] and abs(g["best_score"] - t["best_score"]) < 1e-4


def test_a_tampered_or_linked_graph_is_never_run(fashion_table: Path, class_folders, tmp_path: Path, caplog) -> None:
    w = tmp_path / "w"
    _init(w, fashion_table)
    (graph,) = _graphs(w)
    good = graph.read_bytes()
    graph.write_bytes(good[:-8] + bytes(8))  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        assert CheckpointStore(w).load().backbone_graph is None
    assert "does not match its recorded sha256" in caplog.text
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(good)
    graph.unlink()
    graph.symlink_to(elsewhere)  # even the right bytes, behind a link out of the store
    assert CheckpointStore(w).load().backbone_graph is None
    # the update still learns (the backbone in torch), and puts the checked graph back as a regular file
    data = class_folders([4, 6], per_class=20)
    assert run_cli("-q", "update", "--workdir", str(w), "--data", str(data), "--no-progress", "--no-export") == 0
    assert not graph.is_symlink() and graph.read_bytes() == good
    assert CheckpointStore(w).load().backbone_graph == good


def test_a_version_naming_a_graph_by_something_else_than_a_sha256_is_refused(
    fashion_table: Path, tmp_path: Path, capsys
) -> None:
    w = tmp_path / "w"
    _init(w, fashion_table)
    meta_path = w / "checkpoints" / "v000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["backbone_graph"] = "../../../etc/passwd"
    meta_path.write_text(json.dumps(meta))
    assert run_cli("status", "--workdir", str(w)) == 1
    assert "backbone_graph" in capsys.readouterr().err
