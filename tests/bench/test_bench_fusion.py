"""The fusion methods in the benchmark harness on the embedded sample (CPU, three tiny tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.methods import METHODS
from conftest import render_report

TINY = ["--smoke", "--demo", "--train-per-class", "20", "--test-per-class", "10", "--threads", "2", "--tasks", "3"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def test_fusion_methods_run_and_record_bytes_and_variants(tmp_path: Path) -> None:
    args = ["--protocol", "cifar10-5", "--method", "cvm-fusion,cvm-fusion-routed", "--buffer", "500"]
    assert bench_run.main([*args, "--out", str(tmp_path), *TINY]) == 0
    out = tmp_path / "smoke" / "cifar10-5"
    assert sorted(f.name for f in out.glob("*.json")) == ["cvm-fusion-b0-s0.json", "cvm-fusion-routed-b0-s0.json"]
    unified = json.loads((out / "cvm-fusion-b0-s0.json").read_text())
    routed = json.loads((out / "cvm-fusion-routed-b0-s0.json").read_text())
    for rec in (unified, routed):
        assert len(rec["acc_matrix"]) == 3 and rec["hyperparameters"]["plugins"] == ["fusion"]
        stored = rec["stored_bytes"]
        fused = stored["fusion"]
        assert stored["buffer"] == 0 and stored["total"] == fused["total"] > 0  # data-free: no images kept
        parts = ("base", "unified", "masks", "rescales", "task_stats", "prototypes")
        assert fused["total"] == sum(fused[p] for p in parts)
        # one bit per parameter and task: three masks are about 3/32 of one float32 delta
        assert 3 / 32 <= fused["masks"] / fused["unified"] < 3 / 32 + 0.01
        assert fused["rescales"] == 12
        fusion_log = [t["fusion"] for t in rec["per_task"]]
        assert [len(f["rescales"]) for f in fusion_log] == [1, 2, 3]
        assert fusion_log[0]["rescales"] == [1.0] and fusion_log[0]["rebuild_error_new_task"] == 0.0
        assert set(rec["fusion_variants"]) == {"unified", "top1", "top2"}
    # each method's own figures are one of the variants scored from the same training
    assert unified["acc_matrix"] == unified["fusion_variants"]["unified"]["acc_matrix"]
    assert routed["acc_matrix"] == routed["fusion_variants"]["top2"]["acc_matrix"]
    assert routed["hyperparameters"]["routing"]["top_k"] == 2 and "routing" not in unified["hyperparameters"]
    assert unified["final_avg_acc"] == unified["fusion_variants"]["unified"]["final_avg_acc"]
    # the report shows the stored bytes and the unified / routed comparison
    text = render_report(out, "cifar10-5", tmp_path)
    mb = f"{routed['stored_bytes']['total'] / 2**20:.2f}"
    top2 = f"{routed['fusion_variants']['top2']['final_avg_acc']:.1f}"
    assert "| unified final acc % | top1 final acc % | top2 final acc % | stored MB |" in text
    assert any(line.startswith("| cvm-fusion-routed | 1 | 0 |") and f"| {top2} |" in line for line in text.splitlines())
    assert f"| {mb} |" in text


def test_fusion_methods_are_registered_as_data_free() -> None:
    for name in ("cvm-fusion", "cvm-fusion-routed"):
        m = METHODS[name]
        assert m.plugins == ("fusion",) and not m.uses_buffer and m.head == "concepts"
    assert METHODS["cvm-fusion-routed"].routed_k == 2 and METHODS["cvm-fusion"].routed_k == 0
