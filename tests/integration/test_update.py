"""Continual training end to end through the CLI, on the embedded Fashion-MNIST sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import init_store, run_cli, update_store
from cvm_edge.checkpoints import CheckpointStore


def _old_accuracy(workdir: Path) -> float:
    hist = CheckpointStore(workdir).load().history
    return float(hist[-1]["old_accuracy"])


@pytest.mark.slow
def test_replay_distill_beats_finetuning_by_15_points(fashion_table: Path, class_folders, tmp_path: Path) -> None:
    first, second = class_folders([0, 1], name="t1"), class_folders([2, 3], name="t2")
    results = {}
    for name, plugins in (("cvm", ["--plugins", "replay,distill"]), ("ft", ["--plugins", "none"])):
        wd = tmp_path / name
        init_store(wd, fashion_table, "--buffer-size", "100")
        assert update_store(wd, first, "--epochs", "3", *plugins) == 0
        assert update_store(wd, second, "--epochs", "3", "--force", *plugins) == 0
        results[name] = _old_accuracy(wd)
    assert results["cvm"] - results["ft"] >= 0.15, results


def test_status_rollback_predict(fashion_table: Path, class_folders, tmp_path: Path, capsys) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "40")
    data = class_folders([8, 9], per_class=40)
    assert update_store(wd, data, "--epochs", "1") == 0
    capsys.readouterr()
    assert run_cli("status", "--workdir", str(wd), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest"] == 2 and info["classes"] == ["Bag", "Ankle boot"]
    assert [v["version"] for v in info["versions"]] == [1, 2]
    assert info["history"][0]["new_class_names"] == ["Bag", "Ankle boot"]
    img = next((data / "bag").iterdir())
    assert run_cli("predict", "--workdir", str(wd), str(img), "--top-k", "2", "--json") == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["model_version"] == 2
    labels = [p["label"] for p in pred["results"][0]["predictions"]]
    assert sorted(labels) == ["Ankle boot", "Bag"]  # only learned classes are ever predicted
    assert run_cli("rollback", "--workdir", str(wd)) == 0
    assert CheckpointStore(wd).latest() == 1
    assert run_cli("predict", "--workdir", str(wd), str(img)) == 2  # nothing learned at v1
    assert run_cli("rollback", "--workdir", str(wd), "--to", "2") == 0
    assert CheckpointStore(wd).latest() == 2
    assert run_cli("rollback", "--workdir", str(wd), "--to", "../../etc") == 1
    assert run_cli("rollback", "--workdir", str(wd), "--to", "7") == 1


def test_forgetting_gate_refuses_and_writes_nothing(fashion_table: Path, class_folders, tmp_path: Path, capsys) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "0")
    assert update_store(wd, class_folders([0, 1], per_class=60, name="a"), "--epochs", "2", "--plugins", "none") == 0
    capsys.readouterr()
    code = update_store(
        wd, class_folders([2, 3], per_class=60, name="b"), "--epochs", "3", "--plugins", "none", "--max-forgetting", "5"
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "over --max-forgetting 5" in err and "nothing was published" in err
    assert CheckpointStore(wd).versions() == [1, 2]


def test_plugins_compose_and_ewc_state_persists(fashion_table: Path, class_folders, tmp_path: Path, capsys) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "40")
    plugins = ["--plugins", "replay,distill,ewc", "--force"]
    assert update_store(wd, class_folders([0, 1], per_class=30, name="a"), "--epochs", "1", *plugins) == 0
    ck = CheckpointStore(wd).load()
    ewc = ck.plugin_state["ewc"]
    fisher = [v for k, v in ewc.items() if k.startswith("fisher.")]
    assert fisher and all(float(f.sum()) >= 0 for f in fisher) and any(float(f.sum()) > 0 for f in fisher)
    assert ck.plugins == ("replay", "distill", "ewc")
    assert sorted(ck.buffer.class_counts()) == [0, 1]
    assert update_store(wd, class_folders([2, 3], per_class=30, name="b"), "--epochs", "1", *plugins) == 0
    ck2 = CheckpointStore(wd).load()
    assert ck2.buffer.class_counts() == {0: 10, 1: 10, 2: 10, 3: 10}
    capsys.readouterr()
    png = tmp_path / "acc.png"
    assert run_cli("status", "--workdir", str(wd), "--plot", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diverged_training_fails_and_publishes_nothing(
    fashion_table: Path, class_folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "20")
    # An absurd learning rate sends the weights to inf within an epoch: the loss turns NaN.
    code = update_store(wd, class_folders([0, 1], per_class=20), "--epochs", "3", "--lr", "1e30", "--plugins", "none")
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"cvm: error: task \d+, epoch \d+: the training loss is (nan|inf); lower the learning rate", err)
    assert CheckpointStore(wd).versions() == [1]
    # The last update of a run is after its last checked loss: the trained model's outputs are checked too.
    code = update_store(wd, class_folders([0, 1], per_class=20), "--epochs", "1", "--lr", "1e30", "--plugins", "none")
    assert code == 1
    assert "cvm: error: task 1: after training the model's outputs are not finite" in capsys.readouterr().err
    assert CheckpointStore(wd).versions() == [1]
