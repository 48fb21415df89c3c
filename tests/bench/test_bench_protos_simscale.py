"""Issue 7 items 3 and 4 in the benchmark harness on the embedded Fashion-MNIST sample (CPU, two
tiny tasks, the real bundled MiniLM): ``cvm-protos`` reads a multi-prototype table built from the
curated descriptions, ``cvm-simscale`` records the task-similarity factor it scaled distillation by."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import report
from bench import run as bench_run
from bench.tables import concept_vectors, table_path
from cvm_edge.demo import sample_class_names
from cvm_edge.lab.similarity import class_vectors, task_similarity
from llm_embeddings.descriptions import bundled

TINY = ["--smoke", "--demo", "--train-per-class", "30", "--test-per-class", "10", "--threads", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def test_prototype_table_has_a_row_per_description_and_its_own_cache_file() -> None:
    names = sample_class_names()
    single, fp1 = concept_vectors(names)
    multi, fp2 = concept_vectors(names, prototypes=True)
    assert single.shape == (len(names), 384) and multi.shape[0] == len(names) and multi.ndim == 3
    assert fp1 != fp2 and table_path(names) != table_path(names, prototypes=True)
    per_class = bundled("fashion_mnist")
    for i, name in enumerate(names):
        rows = np.linalg.norm(multi[i], axis=1) > 0  # padding rows are all zero
        assert rows.sum() == 1 + len(per_class[name])
        np.testing.assert_allclose(multi[i, 0], single[i], atol=1e-3)  # the name row is the single-prototype row


def test_protos_and_simscale_methods_run_and_record_what_they_did(tmp_path: Path) -> None:
    argv = ["--protocol", "cifar10-5", "--method", "cvm-protos,cvm-simscale", "--buffer", "20"]
    assert bench_run.main([*argv, "--out", str(tmp_path), *TINY]) == 0
    out = tmp_path / "smoke" / "cifar10-5"
    protos = json.loads((out / "cvm-protos-b20-s0.json").read_text())
    sim = json.loads((out / "cvm-simscale-b20-s0.json").read_text())
    hp_p, hp_s = protos["hyperparameters"], sim["hyperparameters"]
    assert hp_p["concept_table"] != hp_s["concept_table"]  # another table (fingerprint)
    assert hp_p["prototypes"] == "name + bundled descriptions" and hp_s["prototypes"] == "name"
    assert "distill_similarity_factor" not in protos["per_task"][-1]
    assert hp_s["similarity_scaling"] == 1.0
    # the factor of task 1 is the concept table's similarity of its classes to task 0's, power 1
    table, _ = concept_vectors(sim["class_names"])
    expect = task_similarity(class_vectors(table), sim["tasks"][1], sim["tasks"][0]).factor(1.0)
    assert sim["per_task"][1]["distill_similarity_factor"] == pytest.approx(expect, abs=1e-4)
    assert sim["per_task"][1]["distill_similarity_factor"] != 1.0


def _rec(method: str, buffer: int, seed: int, acc: float, tag: str = "") -> dict[str, object]:
    hp = {"epochs": 10, "model": {"train_backbone": "all", "image_size": 32}, "cuda_graph": True, "amp_bf16": True}
    return {
        "protocol": "cifar10-5",
        "method": method,
        "tag": tag,
        "buffer": buffer,
        "seed": seed,
        "device": "cuda:0",
        "hyperparameters": hp,
        "final_avg_acc": acc,
        "forgetting": 10.0,
    }


def test_versus_table_pairs_each_variant_with_the_baseline_of_its_buffer_and_seed() -> None:
    recs = [
        *(_rec("cvm-er-distill", 500, s, 50.0 + s) for s in range(3)),
        *(_rec("cvm-er-distill", 200, s, 40.0) for s in range(3)),
        # listed out of seed order: pairing is by seed, not by position
        *(_rec("cvm-simscale", 500, s, a) for s, a in ((2, 53.0), (0, 51.0), (1, 50.0))),  # +1, -1, +1
        *(_rec("cvm-er", 200, s, 38.0) for s in range(2)),
        _rec("cvm-fusion-routed", 0, 0, 20.0),  # bufferless: against the largest buffer (500)
        _rec("cvm-protos", 500, 0, 99.0, tag="-e3"),  # no baseline with this tag: listed as unpaired
        # the reservoir variant of the product's buffer is paired with derpp-balanced, not the faithful derpp
        *(_rec("derpp-balanced", 500, s, 30.0) for s in range(2)),
        *(_rec("derpp", 500, s, 60.0) for s in range(2)),
        *(_rec("derpp-reservoir", 500, s, 31.0 + s) for s in range(2)),
        _rec("er", 500, 0, 45.0),  # not a paired variant
    ]
    groups: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for r in recs:
        groups.setdefault(report.group_key(r), []).append(r)
    lines = report.render_versus(groups, "cifar10-5")
    rows = {
        line.split(" | ")[0][2:] + "/" + line.split(" | ")[2]: line
        for line in lines
        if line.startswith("| ") and not line.startswith("| method")
    }
    assert set(rows) == {"cvm-simscale/500", "cvm-er/200", "cvm-fusion-routed/-", "derpp-reservoir/500"}
    assert (
        "| derpp-balanced | 500 |" in rows["derpp-reservoir/500"]
        and "| 1.5 ± 0.7 | 2/2 |" in rows["derpp-reservoir/500"]
    )
    assert lines[-1] == "No baseline trained beside: cvm-protos-e3 (buffer 500, 10 epochs, graph bf16)."
    assert "| 51.3 ± 1.5 | 0.3 ± 1.2 | 2/3 |" in rows["cvm-simscale/500"]
    assert "| -2.0 ± 0.0 | 0/2 |" in rows["cvm-er/200"]
    assert "| 20.0 | -30.0 | 0/1 |" in rows["cvm-fusion-routed/-"]
