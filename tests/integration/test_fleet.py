"""Fleet arithmetic (issue 21): the wire format, the round's merge and the fleet's lambda choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cvm_edge.analytic import RidgeStats, balanced_accuracy
from cvm_edge.analytic import choose_lambda as device_choose_lambda
from fleet.merge import QuorumError, Votes, choose_lambda, merge_round
from fleet.settings import FleetSettings
from fleet.wire import Contribution, ContributionError, Expected, pack_stats, packed_bytes, unpack_stats

BASE, TABLE = "b" * 64, "t" * 64


def _stats(seed: int, n: int = 50, dim: int = 12, rows: int = 5, classes: tuple[int, ...] = (0, 1, 2)) -> RidgeStats:
    rng = np.random.default_rng(seed)
    return RidgeStats.empty(dim, rows).add(rng.random((n, dim)), rng.choice(classes, n))


def _c(name: str, stats: RidgeStats, base: str = BASE, table: str = TABLE) -> Contribution:
    return Contribution(name, base, table, stats, f"id-{name}", 0)


def test_a_round_adds_exactly_the_matching_uploads_and_names_the_others() -> None:
    a, b = _stats(1), _stats(2, classes=(2, 3, 4))
    ups = [
        _c("a", a),
        _c("b", b),
        _c("other-base", _stats(3), base="x" * 64),
        _c("other-table", _stats(4), table="y" * 64),
        _c("other-dim", _stats(5, dim=8)),
        _c("more-rows", _stats(6, rows=9)),
    ]
    names = [u.device for u in ups] + ["dropped"]
    start = _stats(7)
    m = merge_round(start, ups, Expected(BASE, TABLE, 5, 12), names, 0.25, failed={"dropped": "no answer"})
    assert m.accepted == ("a", "b")
    assert m.merged_ids == {"a": "id-a", "b": "id-b"}
    one_pass = start.merged(a).merged(b)
    np.testing.assert_allclose(m.stats.gram, one_pass.gram, rtol=1e-12)
    np.testing.assert_array_equal(m.stats.counts, one_pass.counts)
    assert set(m.refused) == {"other-base", "other-table", "other-dim", "more-rows", "dropped"}
    assert "base" in m.refused["other-base"] and "table" in m.refused["other-table"]
    assert "dimension" in m.refused["other-dim"] and "rows" in m.refused["more-rows"]
    with pytest.raises(QuorumError, match="2 of 7 devices contributed") as info:
        merge_round(start, ups, Expected(BASE, TABLE, 5, 12), names, 0.5)
    assert "base" in info.value.refused["other-base"]  # a refused round still names who was left out


def test_wire_round_trip_sends_only_classes_with_images_and_refuses_bad_arrays() -> None:
    s = _stats(1, rows=100, classes=(3, 70))
    for dtype, rtol in (("float64", 0), ("float32", 1e-6)):
        arrays = pack_stats(s, dtype)
        assert arrays["class_sums"].shape == (2, 12)
        back = unpack_stats(arrays)
        np.testing.assert_allclose(back.gram, s.gram, rtol=rtol)
        np.testing.assert_allclose(back.class_sums, s.class_sums, rtol=rtol)
        np.testing.assert_array_equal(back.counts, s.counts)
    bad = pack_stats(s)
    bad["gram_triu"] = bad["gram_triu"].copy()
    bad["gram_triu"][3] = np.nan
    with pytest.raises(ContributionError, match="non-finite"):
        unpack_stats(bad)
    with pytest.raises(ContributionError, match="outside"):
        unpack_stats({**pack_stats(s), "class_rows": np.array([3, 100])})
    with pytest.raises(ContributionError, match="without"):
        unpack_stats({"gram_triu": pack_stats(s)["gram_triu"]})


def test_an_upload_of_m_2048_is_under_9_mb() -> None:
    s = RidgeStats(np.zeros((2048, 2048)), np.ones((43, 2048)), np.ones(43, np.int64))
    assert packed_bytes(pack_stats(s, "float32")) <= 9e6
    assert packed_bytes(pack_stats(s, "float64")) > 16e6  # float64 is the exact option, at twice the bytes


def test_the_fleets_lambda_is_the_one_a_device_would_choose_on_the_union() -> None:
    rng = np.random.default_rng(0)
    grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    labels = [rng.integers(0, 6, 40), rng.integers(2, 8, 25)]  # two devices' held-out images
    preds = [
        [np.where(rng.random(len(y)) < q, y, rng.integers(0, 8, len(y))) for q in (0.5, 0.7, 0.9, 0.6, 0.4)]
        for y in labels
    ]
    votes = []
    for y, p in zip(labels, preds, strict=True):
        correct = np.stack([np.bincount(y[pi == y], minlength=8) for pi in p])
        votes.append(Votes(correct, np.bincount(y, minlength=8)))
    lam, scores = choose_lambda(grid, votes)
    union_labels = np.concatenate(labels)
    union_pred = {g: np.concatenate([p[i] for p in preds]) for i, g in enumerate(grid)}

    class Path:  # the union's predictions per lambda, through analytic.choose_lambda's own loop
        def solve(self, g: float) -> np.ndarray:
            return np.array([[g]])

    ref = device_choose_lambda(Path(), np.ones((1, 1)), union_labels, lambda out: union_pred[float(out[0, 0])], grid)  # type: ignore[arg-type]
    assert lam == ref.relative_lambda == 1e-1
    for g in grid:
        assert scores[f"{g:g}"] == pytest.approx(balanced_accuracy(union_pred[g], union_labels), abs=1e-6)


def test_settings_from_flowers_run_config_refuse_unknown_or_bad_keys(tmp_path) -> None:
    s = FleetSettings.from_run_config({"workdir": str(tmp_path), "rounds": 2, "quorum": 0.5, "min-devices": 3})
    assert (s.rounds, s.quorum, s.min_devices) == (2, 0.5, 3)
    with pytest.raises(ValueError, match="unknown fleet settings: roundz"):
        FleetSettings.from_run_config({"workdir": str(tmp_path), "roundz": 2})
    with pytest.raises(ValueError, match="quorum"):
        FleetSettings.from_run_config({"workdir": str(tmp_path), "quorum": 0})
    with pytest.raises(ValueError, match="workdir"):
        FleetSettings.from_run_config({"rounds": 1})


def test_a_device_that_answers_with_an_error_or_not_at_all_is_named() -> None:
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from fleet.app import _Round

    def reply(node: int, error: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node),
            has_error=lambda: error is not None,
            error=SimpleNamespace(reason=error),
        )

    class Grid:  # Flower's transport stands aside: node 2 fails, node 3 never answers
        def send_and_receive(self, msgs, timeout):
            assert timeout == 5.0 and [(m.dst, m.kind) for m in msgs] == [
                (1, "query.sync"),
                (2, "query.sync"),
                (3, "query.sync"),
            ]
            return [reply(1), reply(2, "ValueError: bad")]

    content = RecordDict({"config": ConfigRecord({"json": "{}"})})
    new = lambda content, kind, node: SimpleNamespace(dst=node, kind=kind)  # noqa: E731
    replies, failed = _Round(Grid(), 5.0, new).ask("query.sync", {1: content, 2: content, 3: content})  # type: ignore[arg-type]
    assert list(replies) == [1]
    assert "bad" in failed[2] and "dropped out" in failed[3]


def test_a_hostile_upload_is_refused_before_the_coordinator_allocates_anything_large() -> None:
    s = _stats(1, rows=10, classes=(3, 7))
    good = pack_stats(s)
    # a few bytes on the wire that named a table of 2**20 rows of 10**9 columns: refused, not allocated
    empty = {**good, "class_rows": np.zeros(0, np.int64), "class_sums": np.zeros((0, 10**9)), "counts": np.zeros(0)}
    with pytest.raises(ContributionError):
        unpack_stats({**empty, "counts": np.zeros(0, np.int64), "rows": np.array([1 << 20])})
    with pytest.raises(ContributionError, match="at most 10"):
        unpack_stats({**good, "rows": np.array([11])}, max_rows=10)
    with pytest.raises(ContributionError, match="dimension 12, the fleet's is 8"):
        unpack_stats(good, dim=8)
    for name, bad in (
        ("class_rows", np.array(["3", "7"])),
        ("counts", np.array([1.5, 2.0])),
        ("gram_triu", good["gram_triu"].astype(complex)),
    ):
        with pytest.raises(ContributionError, match=f"{name} of dtype"):
            unpack_stats({**good, name: bad})
    assert unpack_stats(good, max_rows=10, dim=12).rows == 10


def test_a_broken_or_hostile_answer_is_refused_by_name_not_a_crash_of_the_round() -> None:
    from types import SimpleNamespace

    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fleet.app import MAX_WANTED, _sync_answer, _upload_answer, _votes_answer

    def answer(config: object, **arrays: dict[str, np.ndarray]) -> SimpleNamespace:
        records = {k: ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in v.items()}) for k, v in arrays.items()}
        return SimpleNamespace(content=RecordDict({"config": ConfigRecord({"json": json.dumps(config)}), **records}))

    assert _sync_answer(answer({"name": "a", "wanted": ["cat"]})) == ("a", ["cat"])  # type: ignore[arg-type]
    for bad in (
        {"wanted": []},
        {"name": 3, "wanted": []},
        {"name": "a", "wanted": 7},
        {"name": "a", "wanted": [1]},
        {"name": "a", "wanted": ["x"] * (MAX_WANTED + 1)},
        [1, 2],
    ):
        with pytest.raises(ContributionError):
            _sync_answer(answer(bad))  # type: ignore[arg-type]
    s = _stats(1, rows=5)
    ok = {"base": BASE, "table": TABLE, "id": "i"}
    assert _upload_answer("a", answer(ok, stats=pack_stats(s)), 5, 12).stats.rows == 5  # type: ignore[arg-type]
    for cfg, arrays in (({"base": BASE}, pack_stats(s)), (ok, {}), (ok, {**pack_stats(s), "rows": np.array([6])})):
        with pytest.raises(ContributionError):
            _upload_answer("a", answer(cfg, stats=arrays), 5, 12)  # type: ignore[arg-type]
    good = {"correct": np.array([[1, 0], [2, 1]]), "total": np.array([2, 1])}
    assert _votes_answer(answer({}, votes=good), 2, 5).total.tolist() == [2, 1]  # type: ignore[arg-type]
    for bad_votes in (
        {"correct": np.array([[1, 0]]), "total": np.array([2, 1])},  # another grid
        {"correct": np.array([[3, 0], [2, 1]]), "total": np.array([2, 1])},  # more correct than images
        {"correct": good["correct"].astype(float), "total": np.array([2, 1])},
        {"correct": np.zeros((2, 6), np.int64), "total": np.ones(6, np.int64)},  # more rows than the table
        {"total": np.array([2, 1])},
    ):
        with pytest.raises(ContributionError):
            _votes_answer(answer({}, votes=bad_votes), 2, 5)  # type: ignore[arg-type]


def test_the_fleet_demo_refuses_to_empty_a_folder_it_did_not_make(tmp_path, capsys) -> None:
    from fleet.demo import main

    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["--workdir", str(tmp_path)]) == 2
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert "not a fleet demo's workdir" in capsys.readouterr().err
