"""The experts methods in the benchmark harness on the embedded Fashion-MNIST sample (CPU, 2 tiny
tasks): the result JSON carries the experts' bytes, and the equal-memory variant gives up that
many bytes of replay buffer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.methods import METHODS

TINY = ["--smoke", "--demo", "--train-per-class", "30", "--test-per-class", "10", "--threads", "2"]
# resnet10_cifar_slim features (128) into the MiniLM concept space (384), rank-8 adapters
FEAT, DIM, RANK = 128, 384, 8
SAMPLE_BYTES = 32 * 32 * 3 + 8 + 4 + 2 * 10  # a 32 px image, its label, task tag and float16 logits over 10 rows


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def _expert_bytes(n_experts: int, n_rows: int) -> int:
    return n_experts * (4 * RANK * (FEAT + DIM) + 4 * FEAT + 8) + 8 * n_rows


def test_experts_methods_record_expert_bytes_and_equal_memory_shrinks_the_buffer(tmp_path: Path) -> None:
    assert METHODS["cvm-experts-hard"].model_options["routing"] == "hard"
    argv = ["--protocol", "cifar10-5", "--method", "cvm-experts,cvm-experts-eqmem", "--buffer", "20"]
    assert bench_run.main([*argv, "--out", str(tmp_path), *TINY]) == 0
    out = tmp_path / "smoke" / "cifar10-5"
    soft = json.loads((out / "cvm-experts-b20-s0.json").read_text())
    eq = json.loads((out / "cvm-experts-eqmem-b20-s0.json").read_text())
    for rec in (soft, eq):
        assert len(rec["acc_matrix"]) == 2 and rec["final_avg_acc"] is not None
        assert rec["hyperparameters"]["model"]["experts"] == "adapter"
        assert rec["experts"]["count"] == 2 and rec["experts"]["routing"] == "soft"
        rows = [max(c for t in rec["tasks"][: i + 1] for c in t) + 1 for i in range(2)]
        assert [t["expert_bytes"] for t in rec["per_task"]] == [_expert_bytes(i + 1, rows[i]) for i in range(2)]
        assert rec["expert_bytes"] == rec["experts"]["bytes"] == rec["per_task"][-1]["expert_bytes"]
        assert rec["experts"]["buffer_sample_bytes"] == SAMPLE_BYTES
    # plain experts keep the whole buffer; equal memory gives up ceil(expert bytes / sample bytes) samples
    assert [t["buffer_capacity"] for t in soft["per_task"]] == [20, 20] and soft["per_task"][-1]["buffer_size"] == 20
    assert not soft["experts"]["equal_memory"] and eq["experts"]["equal_memory"]
    caps = [20 - math.ceil(t["expert_bytes"] / SAMPLE_BYTES) for t in eq["per_task"]]
    assert [t["buffer_capacity"] for t in eq["per_task"]] == caps and caps[1] < caps[0] < 20
    assert eq["per_task"][-1]["buffer_size"] == caps[1]
    # what persists between tasks fits the plain buffer's bytes; without the cut it does not
    assert eq["buffer_bytes"] + eq["expert_bytes"] <= 20 * SAMPLE_BYTES < soft["buffer_bytes"] + soft["expert_bytes"]


def test_equal_memory_capacity_counts_every_started_sample() -> None:
    assert bench_run.equal_memory_capacity(200, 0, 3100) == 200
    assert bench_run.equal_memory_capacity(200, 1, 3100) == 199
    assert bench_run.equal_memory_capacity(200, 3100, 3100) == 199
    assert bench_run.equal_memory_capacity(200, 3101, 3100) == 198
    assert bench_run.equal_memory_capacity(2, 10**6, 3100) == 0


def test_experts_runs_record_how_often_routing_picks_the_right_expert(tmp_path: Path) -> None:
    argv = ["--protocol", "cifar10-5", "--method", "cvm-experts-hard", "--buffer", "20"]
    assert bench_run.main([*argv, "--out", str(tmp_path), *TINY]) == 0
    rec = json.loads((tmp_path / "smoke" / "cifar10-5" / "cvm-experts-hard-b20-s0.json").read_text())
    rows = [t["routing_acc"] for t in rec["per_task"]]
    assert rows[0] == [100.0, None]  # one expert: every image goes to it
    assert rows[1][1] is not None and all(0.0 <= r <= 100.0 for r in rows[1])
    assert rec["experts"]["routing_acc"] == rows[1]
    assert rec["experts"]["routing_acc_mean"] == pytest.approx(sum(rows[1]) / 2, abs=1e-3)
