"""The benchmark harness end to end on the embedded Fashion-MNIST sample (CPU, well under a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report
from bench import run as bench_run
from bench.metrics import average_incremental, backward_transfer, final_average, forgetting
from bench.protocols import PROTOCOLS, build_scenario, class_order

TINY = ["--smoke", "--demo", "--train-per-class", "30", "--test-per-class", "10", "--threads", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def test_smoke_runs_write_results_and_report(tmp_path: Path) -> None:
    methods = "finetune,joint,er,derpp,lwf,ewc,cvm-er-distill"
    assert bench_run.main(["--protocol", "cifar10-5", "--method", methods, "--out", str(tmp_path), *TINY]) == 0
    files = sorted((tmp_path / "smoke" / "cifar10-5").glob("*.json"))
    assert [f.name for f in files] == [
        "cvm-er-distill-b200-s0.json",
        "derpp-b200-s0.json",
        "er-b200-s0.json",
        "ewc-b0-s0.json",
        "finetune-b0-s0.json",
        "joint-b0-s0.json",
        "lwf-b0-s0.json",
    ]
    rec = json.loads(files[1].read_text())
    assert len(rec["acc_matrix"]) == 2 and rec["acc_matrix"][0][1] is None
    assert rec["hyperparameters"]["der_alpha"] == 0.1 and rec["hyperparameters"]["lr"] == 0.03
    for key in ("command", "git_commit", "machine", "versions", "date", "peak_memory", "images_per_s", "forgetting"):
        assert key in rec
    joint = json.loads((tmp_path / "smoke" / "cifar10-5" / "joint-b0-s0.json").read_text())
    assert len(joint["acc_matrix"]) == 1 and None not in joint["acc_matrix"][0]
    # the report renders grids from a results tree (smoke runs are moved into a protocol folder here)
    proto = tmp_path / "res" / "cifar10-5"
    proto.mkdir(parents=True)
    for f in files:
        (proto / f.name).write_text(f.read_text())
    out = tmp_path / "B.md"
    assert report.main(["--results", str(tmp_path / "res"), "--out", str(out), "--plots", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "| derpp | 200 |" in text and "64.88" in text
    assert (tmp_path / "plots" / "cifar10-5-accuracy-matrix.png").is_file()
    assert (tmp_path / "plots" / "cifar10-5-accuracy-curves.png").is_file()


def test_same_seed_same_class_order_and_accuracy(tmp_path: Path) -> None:
    assert class_order(10, 3) == class_order(10, 3) != class_order(10, 4)
    a = build_scenario(PROTOCOLS["cifar10-5"], 5, use_demo=True, n_tasks=3)
    b = build_scenario(PROTOCOLS["cifar10-5"], 5, use_demo=True, n_tasks=3)
    assert a.tasks == b.tasks and len(a.tasks) == 3
    accs = []
    for i in range(2):
        out = tmp_path / str(i)
        assert (
            bench_run.main(["--protocol", "cifar10-5", "--method", "er", "--seed", "1", "--out", str(out), *TINY]) == 0
        )
        accs.append(json.loads((out / "smoke" / "cifar10-5" / "er-b200-s1.json").read_text())["final_avg_acc"])
    assert abs(accs[0] - accs[1]) <= 0.5


def test_multidomain_scenario_orders_domains() -> None:
    p = PROTOCOLS["multidomain-30"]
    assert p.classes_per_task == 5 and p.datasets == ("cifar10", "fashion_mnist", "imagenette")


def test_metrics_on_a_known_matrix() -> None:
    a = [[90.0, None, None], [60.0, 80.0, None], [50.0, 70.0, 85.0]]
    assert final_average(a) == pytest.approx((50 + 70 + 85) / 3)
    assert average_incremental(a) == pytest.approx((90 + 70 + (50 + 70 + 85) / 3) / 3)
    assert forgetting(a) == pytest.approx(((90 - 50) + (80 - 70)) / 2)
    assert backward_transfer(a) == pytest.approx(((50 - 90) + (70 - 80)) / 2)
    assert forgetting([[90.0]]) is None
