"""bench.mammoth_side: our CIFAR-10 in torchvision's on-disk format (what Mammoth reads), relabelled so
that Mammoth's tasks are our seeded tasks, and Mammoth's logs as our result JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets
import torchvision.datasets.cifar

from bench import mammoth_side
from bench.datasets import Dataset, Split
from bench.protocols import PROTOCOLS, build_scenario

REPO = Path(__file__).resolve().parents[2]


def _fake_cifar(size: int = 32) -> Dataset:
    rng = np.random.default_rng(0)
    names = tuple(f"class{c}" for c in range(10))

    def split(n: int) -> Split:
        return Split(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)

    return Dataset("cifar10", names, split(50), split(20))


def test_converted_data_reads_back_through_torchvision_with_our_tasks_as_mammoths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _fake_cifar()
    monkeypatch.setattr(mammoth_side, "load_dataset", lambda name, size: ds)
    mammoth_side.convert(3, tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", torchvision.datasets.CIFAR10._check_integrity)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", torchvision.datasets.cifar.check_integrity)
    mammoth_side.trust_converted_cifar()  # undone by monkeypatch at the end of the test
    train = torchvision.datasets.CIFAR10(str(tmp_path / "CIFAR10"), train=True)
    test = torchvision.datasets.CIFAR10(str(tmp_path / "CIFAR10"), train=False)
    assert np.array_equal(train.data, ds.train.images) and np.array_equal(test.data, ds.test.images)
    new = mammoth_side.relabelling(3)
    assert train.targets == new[ds.train.labels].tolist() and test.targets == new[ds.test.labels].tolist()
    # Mammoth's task t (its classes 2t, 2t + 1) is our seeded task t
    tasks = build_scenario(PROTOCOLS["cifar10-5"], 3, use_demo=True).tasks
    for t, ours in enumerate(tasks):
        assert sorted(new[list(ours)].tolist()) == [2 * t, 2 * t + 1]
    meta = json.loads((tmp_path / "relabelling.json").read_text())
    assert meta["seed"] == 3 and meta["ours_to_mammoth"] == new.tolist()


def test_mammoth_logs_become_our_result_json(tmp_path: Path) -> None:
    acc = {f"accuracy_{j + 1}_task{i + 1}": 90.0 - 10 * (i - j) for i in range(5) for j in range(i + 1)}
    other = {"seed": 0, "model": "er", "lr": 0.1, "device": "cuda:0"}
    line = str({"seed": 1, "model": "derpp", "lr": 0.03, "alpha": 0.2, "beta": 0.5, **acc, "extra": None})
    logs = tmp_path / "logs.pyd"
    logs.write_text(str(other) + "\n" + line + "\n")
    path = mammoth_side.collect(logs, 1, 500, 5, "e75a491", "--model derpp --lr 0.03", tmp_path / "out", wall_s=12.5)
    assert path.name == "mammoth-derpp-b500-s1.json"
    rec = json.loads(path.read_text())
    assert rec["method"] == "mammoth-derpp" and rec["buffer"] == 500 and rec["seed"] == 1
    assert rec["acc_matrix"][1] == [80.0, 90.0, None, None, None]
    assert rec["final_avg_acc"] == pytest.approx(np.mean([50, 60, 70, 80, 90]))
    hp = rec["hyperparameters"]
    assert hp["mammoth_commit"] == "e75a491" and hp["mammoth_args"] == "--model derpp --lr 0.03"
    assert hp["alpha"] == 0.2 and hp["epochs"] == 5 and rec["wall_s"] == 12.5
    with pytest.raises(SystemExit, match="seed 7"):
        mammoth_side.collect(logs, 7, 500, 5, "e75a491", "", tmp_path / "out")


FAKE_MAIN = """
import sys
from pathlib import Path

a = sys.argv[1:]
opt = {k: a[i + 1] for i, k in enumerate(a[:-1]) if k.startswith("--")}
acc = {f"accuracy_{j + 1}_task{i + 1}": 80.0 for i in range(5) for j in range(i + 1)}
rec = {"seed": int(opt["--seed"]), "model": opt["--model"], "lr": float(opt["--lr"]), **acc}
out = Path(opt["--base_path"]) / opt["--results_path"] / "class-il" / "seq-cifar10" / opt["--model"]
out.mkdir(parents=True)
(out / "logs.pyd").write_text(str(rec) + "\\n")
"""


def test_grid_script_turns_one_mammoth_run_into_a_tagged_result_json(tmp_path: Path) -> None:
    """bench/mammoth_grid.sh's `one` mode end to end, with a stand-in for Mammoth's main.py that
    writes logs.pyd where Mammoth does. On the H200 its collect step once failed (``--tag -e5`` was
    read as an option), so no Mammoth result came back from the machine."""
    mammoth = tmp_path / "mammoth"
    mammoth.mkdir()
    (mammoth / "main.py").write_text(FAKE_MAIN)
    (tmp_path / "mm-data" / "s0").mkdir(parents=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # its python3 is this one
        "CVM_MAMMOTH": str(mammoth),
        "CVM_MAMMOTH_DATA": str(tmp_path / "mm-data"),
        "CVM_MAMMOTH_RESULTS": str(tmp_path / "res"),
    }
    script = REPO / "bench" / "mammoth_grid.sh"
    done = subprocess.run(
        ["bash", str(script), "one", "5", "0", "200", "er", "cpu"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((tmp_path / "res" / "mammoth-er-e5-b200-s0.json").read_text())
    assert rec["tag"] == "-e5" and rec["method"] == "mammoth-er" and rec["final_avg_acc"] == pytest.approx(80.0)
    assert "--n_epochs 5" in rec["hyperparameters"]["mammoth_args"]
