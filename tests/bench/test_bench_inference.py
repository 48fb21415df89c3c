"""bench/inference.py --quick on the 32-px backbone: a real store, real bundles, a real server process.

Checks the result's structure and that every figure is a positive number; no timing is asserted
(speed lives in the benchmark's own results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.inference import SIDES, summary_lines
from bench.report import render_inference
from conftest import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_DATA / "photos" / "tench_29.jpg").is_file(), reason="needs ../shared/data/photos"),
]

LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "throughput_qps")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench-inference")
    out = tmp / "inference.json"
    cmd = [sys.executable, "-m", "bench.inference", "--quick", "--models", "resnet18_cifar"]
    cmd += ["--precisions", "fp32,int8", "--queries", "16", "--work", str(tmp / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_provenance_and_settings(result: dict) -> None:
    assert result["benchmark"] == "inference" and result["quick"] is True
    assert result["command"].startswith("python -m bench.inference --quick")
    assert len(result["git_commit"]) >= 40 and result["date"].startswith("20")
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["cpu"]
    assert result["versions"]["onnxruntime"] and result["versions"]["torch"] and result["versions"]["python"]
    s = result["settings"]
    assert s["queries"] == 16 and s["threads"] == [1] and s["precisions"] == ["fp32", "int8"]
    assert set(result["sides"]) == set(SIDES)


def test_floor_inputs_are_measured(result: dict) -> None:
    peak = result["peak_matmul"]["threads"]["1"]
    assert _positive(peak["gflops"]) and all(_positive(v) for v in peak["by_size"].values())
    (m,) = result["models"]
    assert m["backbone"] == "resnet18_cifar" and m["image_size"] == 32
    assert _positive(m["flops"]) and m["gflops"] == pytest.approx(m["flops"] / 1e9, rel=1e-3)
    assert "FlopCounterMode" in m["flops_method"]
    assert m["query_image"].endswith("bytes") and "32x32" in m["query_image"]
    assert all(_positive(v) for v in m["preprocessing"].values())


def test_every_side_of_every_config_has_positive_figures(result: dict) -> None:
    (m,) = result["models"]
    assert set(m["bundles"]) == {"fp32", "int8"}
    assert m["bundles"]["int8"]["model_bytes"] < m["bundles"]["fp32"]["model_bytes"]
    runs = {(r["precision"], r["threads"]): r for r in m["runs"]}
    assert set(runs) == {("fp32", 1), ("int8", 1)}
    for (precision, _), r in runs.items():
        expected = set(SIDES) if precision == "fp32" else set(SIDES) - {"torch_eager"}
        assert set(r["sides"]) == expected  # torch eager runs the fp32 graph only
        for side in r["sides"].values():
            assert side["n"] >= 16
            assert all(_positive(side[k]) for k in LATENCY_KEYS)
            assert side["p50_ms"] <= side["p90_ms"] <= side["p99_ms"]
        assert _positive(r["floor_ms"]) and all(_positive(v) for v in r["ratios"].values())
        assert r["server_and_predictor_agree"] is True
        assert r["server_answer"] and {"label", "score"} <= set(r["server_answer"][0])
        b = r["batch"]
        assert b["images"] == 8 and all(_positive(b[k]) for k in b)


def test_summary_and_report_rows(result: dict, tmp_path: Path) -> None:
    lines = summary_lines(result)
    assert any(line.startswith("resnet18_cifar@32      fp32") for line in lines)
    assert any(line.startswith("resnet18_cifar@32      int8") for line in lines)
    (tmp_path / "inference.json").write_text(json.dumps(result))
    rows = render_inference(tmp_path)
    assert sum(1 for r in rows if r.startswith("| resnet18_cifar")) == 2
    assert any(result["git_commit"][:12] in r for r in rows)


def test_an_analytic_store_keeps_no_images_and_still_gets_its_int8_bundle(tmp_path: Path) -> None:
    """`cvm init` on a pretrained backbone makes an analytic store, which keeps no images: the bench
    exports fp16/int8 with the photos its update learned from (it was refused for want of images)."""
    from bench.inference import ensure_bundles
    from bench.server_latency import build_store
    from cvm_edge.checkpoints import CheckpointStore

    wd = build_store(tmp_path, image_size=64)  # Lite0, offline weights: cvm init picks the analytic learner
    assert len(CheckpointStore(wd).load().buffer) == 0
    bundles = ensure_bundles(wd, ["int8"])
    assert "error" not in bundles["int8"], bundles["int8"]
    assert bundles["int8"]["int8_weights"] in ("int8", "uint8")
