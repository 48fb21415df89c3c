"""The analytic learner: sums, closed-form solve, the store and the commands around it."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FASHION_NAMES, run_cli, sample_pixels
from cvm_edge import analytic as an
from cvm_edge import analytic_learner as al
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.model import ModelConfig, build_model
from cvm_edge.pretrained import offline_weights_available
from cvm_edge.update import PARITY_SAMPLE

needs_lite0 = pytest.mark.skipif(not offline_weights_available(), reason="offline Lite0 weights not installed")


def _random_problem(n: int = 300, f: int = 24, m: int = 64, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, f)).astype(np.float32) + np.repeat(rng.normal(size=(classes, f)), n // classes, 0)
    labels = np.repeat(np.arange(classes), n // classes)
    p = an.projection(f, m, seed)
    return feats, labels, p


def test_two_updates_sum_to_one_joint_pass() -> None:
    feats, labels, p = _random_problem()
    h = an.lift(feats, p)
    first, second = labels < 2, labels >= 2
    two = an.RidgeStats.empty(64, 3).add(h[first], labels[first]).grown(5).add(h[second], labels[second])
    one = an.RidgeStats.empty(64, 5).add(h, labels)
    np.testing.assert_allclose(two.gram, one.gram, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(two.class_sums, one.class_sums, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(two.counts, one.counts)
    # and merging two devices' sums is the same again (the fleet's analytic merge)
    merged = (
        an.RidgeStats.empty(64, 5)
        .add(h[first], labels[first])
        .merged(an.RidgeStats.empty(64, 5).add(h[second], labels[second]))
    )
    np.testing.assert_allclose(merged.gram, one.gram, rtol=1e-12, atol=1e-9)


def test_ridge_solution_equals_a_direct_solve_on_all_features() -> None:
    feats, labels, p = _random_problem()
    h = an.lift(feats, p)
    table = np.random.default_rng(1).normal(size=(5, 16))
    targets = an.class_targets(table, "concepts")
    stats = an.RidgeStats.empty(64, 5).add(h, labels)
    lam = 1e-2 * np.trace(h.T @ h) / 64
    direct = np.linalg.solve(h.T @ h + lam * np.eye(64), h.T @ targets[labels])
    np.testing.assert_allclose(an.RidgePath.of(stats, targets).solve(1e-2), direct, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(an.solve(stats, targets, 1e-2), direct, rtol=1e-8, atol=1e-10)


def test_the_in_place_solve_solves_every_lambda_of_one_g_and_leaves_g_as_the_store_keeps_it() -> None:
    feats, labels, p = _random_problem(n=600, m=300)
    h = an.lift(feats, p)
    stats = an.RidgeStats.empty(300, 5).add(h, labels)
    stored = stats.to_arrays()["gram_triu"].copy()
    path = an.RidgePath.of(stats, np.eye(5))
    for rel in (1e-5, 1e-2, 1.0):  # one G, several lambdas: each must see G itself, not the last factor
        lam = rel * np.trace(h.T @ h) / 300
        direct = np.linalg.solve(h.T @ h + lam * np.eye(300), h.T @ np.eye(5)[labels])
        np.testing.assert_allclose(path.solve(rel), direct, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(stats.to_arrays()["gram_triu"], stored)
    np.testing.assert_array_equal(stats.gram, stats.gram.T)  # the work triangle is restored
    # a matrix LAPACK cannot factor takes the general solve and is restored all the same
    bad = an.RidgeStats(-np.eye(300), stats.class_sums, stats.counts)
    w = an.RidgePath(bad.gram, np.ones((300, 2)), 1.0).solve(0.5)
    np.testing.assert_allclose(w, np.full((300, 2), -2.0))
    np.testing.assert_array_equal(bad.gram, -np.eye(300))


def test_targets_concepts_are_unit_rows_and_multi_prototype_means() -> None:
    t = np.zeros((2, 3, 4))
    t[0, 0] = [1, 0, 0, 0]
    t[0, 1] = [0, 1, 0, 0]  # class 0: two prototypes; slot 2 is padding
    t[1, 0] = [0, 0, 2, 0]
    got = an.class_targets(t, "concepts")
    np.testing.assert_allclose(got, [[2**-0.5, 2**-0.5, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(an.class_targets(t, "onehot"), np.eye(2))


def test_lambda_is_chosen_on_held_out_images_and_refuses_nothing_silently() -> None:
    feats, labels, p = _random_problem(n=500)
    h = an.lift(feats, p)
    stats = an.RidgeStats.empty(64, 5).add(h[::2], labels[::2])
    path = an.RidgePath.of(stats, np.eye(5))
    choice = an.choose_lambda(path, h[1::2], labels[1::2], lambda out: out.argmax(1))
    assert set(choice.scores) == {f"{x:g}" for x in an.RELATIVE_LAMBDAS}
    assert choice.scores[f"{choice.relative_lambda:g}"] == max(choice.scores.values())


def test_stats_round_trip_and_tampered_shapes_are_refused() -> None:
    feats, labels, p = _random_problem()
    stats = an.RidgeStats.empty(64, 5).add(an.lift(feats, p), labels)
    back = an.RidgeStats.from_arrays(stats.to_arrays())
    np.testing.assert_array_equal(back.gram, stats.gram)
    # the store's file streams G's triangle a row at a time: np.load reads what to_arrays packs
    buf = io.BytesIO()
    stats.write_npz(buf, {})
    with np.load(io.BytesIO(buf.getvalue()), allow_pickle=False) as z:
        assert sorted(z.files) == ["class_sums", "counts", "gram_triu"]
        for key, arr in stats.to_arrays().items():
            np.testing.assert_array_equal(z[key], arr)
    bad = stats.to_arrays()
    bad["gram_triu"] = bad["gram_triu"][:-1]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        an.RidgeStats.from_arrays(bad)
    bad = stats.to_arrays()
    bad["class_sums"] = bad["class_sums"].copy()
    bad["class_sums"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        an.RidgeStats.from_arrays(bad)


def test_projection_is_fixed_by_its_seed() -> None:
    a, b = an.projection(8, 16, 3), an.projection(8, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert an.projection_digest(a) != an.projection_digest(an.projection(8, 16, 4))


def test_learner_two_updates_equal_one_joint_pass_through_the_served_module() -> None:
    """al.learn (what `cvm update` runs) twice gives the sums, and so the weight, of one pass."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(4, 16)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    config = ModelConfig("resnet10_cifar_slim", 32, train_backbone="none", learner="analytic", analytic_dim=32)
    feats = rng.normal(size=(80, 128)).astype(np.float32)
    labels = np.repeat(np.arange(4), 20)
    val = rng.normal(size=(8, 128)).astype(np.float32)
    vlab = np.repeat(np.arange(4), 2)

    def fresh():
        torch.manual_seed(0)
        return build_model(config, table)

    m1 = fresh()
    s = al.AnalyticState.empty(m1)
    a, b = labels < 2, labels >= 2
    s = al.learn(m1, table, s, feats[a], labels[a], val[:4], vlab[:4], [0, 1], 1).state
    s = al.learn(m1, table, s, feats[b], labels[b], val[4:], vlab[4:], [0, 1, 2, 3], 2).state
    m2 = fresh()
    joint = al.learn(m2, table, al.AnalyticState.empty(m2), feats, labels, val, vlab, [0, 1, 2, 3], 1)
    np.testing.assert_allclose(s.stats.gram, joint.state.stats.gram, rtol=1e-10)
    np.testing.assert_allclose(s.stats.class_sums, joint.state.stats.class_sums, rtol=1e-10)
    torch.testing.assert_close(m1.head.mapper.weight, m2.head.mapper.weight)
    # a round trip of the state through its file keeps everything
    buf = io.BytesIO()
    s.write(buf)
    back = al.AnalyticState.from_bytes(buf.getvalue())
    np.testing.assert_array_equal(back.stats.gram, s.stats.gram)
    np.testing.assert_array_equal(back.held_out.labels, s.held_out.labels)


# ----- the commands, on real images (the embedded Fashion-MNIST sample) through the offline Lite0 ------------------
def _init(workdir: Path, table: Path, *extra: str) -> None:
    args = ["-q", "init", "--workdir", str(workdir), "--concepts", str(table), "--image-size", "32"]
    assert run_cli(*args, "--analytic-dim", "256", *extra) == 0


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@needs_lite0
def test_cvm_init_defaults_to_the_analytic_learner_on_a_pretrained_backbone(
    fashion_table: Path, tmp_path: Path
) -> None:
    _init(tmp_path / "w", fashion_table)
    meta = json.loads((tmp_path / "w" / "checkpoints" / "v000001" / "meta.json").read_text())
    assert meta["model"]["learner"] == "analytic" and meta["model"]["train_backbone"] == "none"
    assert (tmp_path / "w" / "checkpoints" / "v000001" / al.ANALYTIC_FILE).is_file()
    # the analytic learner with a training backbone is a usage error (exit 2)
    code = run_cli(
        "-q",
        "init",
        "--workdir",
        str(tmp_path / "x"),
        "--concepts",
        str(fashion_table),
        "--learner",
        "analytic",
        "--train-backbone",
        "all",
    )
    assert code == 2
    # a split by image content is for a gradient store's pixels: refused before the folder is read
    from cvm_edge.errors import UsageError
    from cvm_edge.update import UpdateOptions, run_update

    with pytest.raises(UsageError, match="holdout_by 'content'"):
        run_update(tmp_path / "w", UpdateOptions(data_dir=tmp_path / "no-such-folder", holdout_by="content"))


@needs_lite0
def test_analytic_update_stores_no_images_and_exports_with_parity(
    fashion_table: Path, class_folders, tmp_path: Path, capsys
) -> None:
    w = tmp_path / "w"
    _init(w, fashion_table)
    data = class_folders([0, 1], per_class=40)
    assert run_cli("-q", "update", "--workdir", str(w), "--data", str(data), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "published bundle" in out
    ckpt = CheckpointStore(w).load()
    assert ckpt.analytic is not None and len(ckpt.val) == 0 and len(ckpt.buffer) == 0
    assert len(ckpt.analytic.held_out) == 16  # 20 % of 40 per class, as features only
    entry = ckpt.history[-1]
    assert entry["learner"] == "analytic" and entry["relative_lambda"] in an.RELATIVE_LAMBDAS
    assert entry["new_accuracy"] > 0.8
    assert " MB)" in out  # the version's size is printed, and recorded in its metadata
    meta = json.loads((w / "checkpoints" / "v000002" / "meta.json").read_text())
    assert 0 < meta["files_bytes"] < 40e6
    manifest = json.loads((w / "bundles" / "v000002" / "manifest.json").read_text())
    # the update hands its export a seeded sample of its 80 images, as many as the gate needs
    assert manifest["parity"]["passed"] and manifest["parity"]["images"]["given"] == PARITY_SAMPLE == 64
    assert manifest["model"]["learner"] == "analytic" and "torchscript" in manifest["exporter"]
    # standalone export of an image-less store needs images to check parity on
    assert run_cli("-q", "export", "--workdir", str(w), "--precision", "fp16") == 2
    assert "--images DIR" in capsys.readouterr().err
    assert run_cli("-q", "export", "--workdir", str(w), "--precision", "fp16", "--images", str(data)) == 0
    capsys.readouterr()
    fp16 = json.loads((w / "bundles" / "v000002-fp16" / "manifest.json").read_text())
    assert fp16["parity"]["passed"] and fp16["parity"]["images"]["given"] == 80
    # int8 calibrates on the handed-in images: it passes its gate, or is refused naming the gate
    code = run_cli("-q", "export", "--workdir", str(w), "--precision", "int8", "--images", str(data))
    err = capsys.readouterr().err
    if code == 0:
        int8 = json.loads((w / "bundles" / "v000002-int8" / "manifest.json").read_text())
        assert int8["parity"]["calibration"]["source"] == "images handed to the export"
    else:
        assert code == 1 and "int8 parity gate failed" in err
    # predict through the analytic model, with the unknown flag calibrated on the held-out features
    img = next((data / "trouser").glob("*.png"))
    assert run_cli("predict", "--workdir", str(w), str(img), "--json") == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["predictions"][0]["label"] == "Trouser" and result["unknown"] is False
    assert result["best_score"] >= result["unknown_threshold"] == entry["unknown_threshold"]
    assert fp16["unknown"]["threshold"] == entry["unknown_threshold"]
    # real images of classes the store never learned (sneakers, bags) score lower than learned ones; with
    # the threshold at 5 % of known held-out images few learned images are flagged (the flag is weak:
    # bench/BENCHMARKS.md gives its AUROC per protocol)
    seen_imgs = sorted((data / "t-shirt-top").glob("*.png"))[:10] + sorted((data / "trouser").glob("*.png"))[:10]
    unseen = class_folders([7, 8], per_class=10, name="unseen")
    unseen_imgs = sorted(unseen.rglob("*.png"))
    assert run_cli("predict", "--workdir", str(w), *map(str, seen_imgs + unseen_imgs), "--json") == 0
    results = json.loads(capsys.readouterr().out)["results"]
    seen_scores = [r["best_score"] for r in results[: len(seen_imgs)]]
    unseen_scores = [r["best_score"] for r in results[len(seen_imgs) :]]
    assert np.mean(unseen_scores) < np.mean(seen_scores) - 0.05, (seen_scores, unseen_scores)
    assert sum(r["unknown"] for r in results[: len(seen_imgs)]) <= 4
    assert all(r["unknown"] == (r["best_score"] < r["unknown_threshold"]) for r in results)


@needs_lite0
def test_refused_analytic_update_leaves_the_store_bit_identical(
    fashion_table: Path, class_folders, tmp_path: Path
) -> None:
    w = tmp_path / "w"
    _init(w, fashion_table)
    assert (
        run_cli(
            "-q",
            "update",
            "--workdir",
            str(w),
            "--data",
            str(class_folders([0, 6], 40, "a")),
            "--no-progress",
            "--no-export",
        )
        == 0
    )
    before = _digest_tree(w)
    # T-shirt/top vs Shirt, then Pullover and Coat: confusable classes; a zero margin refuses the update
    code = run_cli(
        "-q",
        "update",
        "--workdir",
        str(w),
        "--data",
        str(class_folders([2, 4], 40, "b")),
        "--no-progress",
        "--max-forgetting",
        "0",
    )
    assert code == 1
    assert _digest_tree(w) == before


def test_small_steps_cannot_add_up_past_the_forgetting_gate() -> None:
    """Three updates of 4 points each: every step passes a 10-point gate against the previous version,
    the third fails against the accuracy the class had when it was learned."""
    from cvm_edge.gate import forgetting_gate

    history = [{"trained_classes": [0], "per_class_accuracy": {"0": 0.90}}]
    now = 0.90
    for _ in range(3):
        gate = forgetting_gate(history, [0], {0: now}, {0: now - 0.04})
        assert round(gate.since_previous, 6) == 4.0
        history.append({"trained_classes": [1], "per_class_accuracy": {"0": now - 0.04, "1": 0.9}})
        now -= 0.04
    assert round(gate.since_learned, 6) == 12.0 and "since when they were learned (90.0% -> 78.0%)" in gate.describe()
    assert gate.figures()["forgetting_since_learned"] == 12.0


def test_forgetting_gate_compares_with_accuracy_when_learned() -> None:
    from cvm_edge.gate import accuracy_when_learned

    history = [
        {"trained_classes": [0, 1], "per_class_accuracy": {"0": 0.9, "1": 0.8}},
        {"trained_classes": [2], "per_class_accuracy": {"0": 0.85, "1": 0.75, "2": 0.7}},
        {"trained_classes": [1], "per_class_accuracy": {"0": 0.8, "1": 0.95, "2": 0.6}},  # 1 revisited
    ]
    assert accuracy_when_learned(history, [0, 1, 2]) == {0: 0.9, 1: 0.95, 2: 0.7}


@needs_lite0
def test_one_analytic_version_of_100_classes_at_m_2048_is_at_most_40_mb(sample, tmp_path: Path) -> None:
    """Issue 17's store target: one version (the frozen backbone, G's upper triangle in float64, the class
    sums, the ridge weight, the held-out features) of a 100-class store at the default M stays within 40 MB."""
    from cvm_edge.demo import write_class_folders

    names = list(FASHION_NAMES) + [f"object {i}" for i in range(90)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    table = tmp_path / "t.npz"
    assert run_cli("-q", "embed", "build", "--classes", str(tmp_path / "classes.txt"), "--out", str(table)) == 0
    w = tmp_path / "w"
    assert run_cli("-q", "init", "--workdir", str(w), "--concepts", str(table), "--image-size", "32") == 0
    # five real images a class (the embedded Fashion-MNIST sample's, class c % 10): one held out each
    labels = sample["train_labels"]
    keep = np.concatenate([np.flatnonzero(labels == c % 10)[5 * (c // 10) : 5 * (c // 10) + 5] for c in range(100)])
    data = write_class_folders(
        tmp_path / "d", sample["train_images"][keep], np.repeat(np.arange(100), 5), names, range(100)
    )
    assert run_cli("-q", "update", "--workdir", str(w), "--data", str(data), "--no-progress", "--no-export") == 0
    ckpt = CheckpointStore(w).load()
    assert ckpt.model_config.analytic_dim == an.DEFAULT_DIM == 2048 and len(ckpt.seen) == 100
    meta = json.loads((w / "checkpoints" / "v000002" / "meta.json").read_text())
    files = {p.name: p.stat().st_size for p in (w / "checkpoints" / "v000002").iterdir()}
    assert files[al.ANALYTIC_FILE] > 2048 * 2049 // 2 * 8  # G's triangle really is in the version
    assert meta["files_bytes"] == sum(v for k, v in files.items() if k != "meta.json")
    assert meta["files_bytes"] <= 40_000_000, files


def test_upper_triangle_packing_and_chunked_sums_match_the_direct_forms() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 7))
    a = a + a.T
    packed = an.upper_triangle(a)
    np.testing.assert_array_equal(packed, a[np.triu_indices(7)])  # the on-flash order is unchanged
    np.testing.assert_array_equal(an.symmetric_from_upper(packed, 7), a)
    feats, labels, p = _random_problem()
    h = an.lift(feats, p)
    one = an.RidgeStats.empty(64, 5).add(h, labels)
    chunked = an.RidgeStats.empty(64, 5).add_chunks((h[i : i + 37], labels[i : i + 37]) for i in range(0, len(h), 37))
    np.testing.assert_allclose(chunked.gram, h.T @ h, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(chunked.gram, one.gram, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(chunked.counts, one.counts)


@needs_lite0
def test_backbone_features_of_onnxruntime_equal_torchs_on_real_images(sample) -> None:
    """The analytic update reads features through onnxruntime on the CPU; they are torch's to float tolerance."""
    from cvm_edge.frozen_features import BackboneFeatures
    from cvm_edge.pretrained import load_pretrained_backbone

    backbone, prep, _ = load_pretrained_backbone("tf_efficientnet_lite0", "offline", 64)
    pixels = sample_pixels(sample["train_images"][:12], prep)
    extract = BackboneFeatures(backbone, prep)
    assert extract.engine == "onnxruntime"
    got = extract(pixels)
    ref = extract.torch_features(pixels)
    assert got.shape == ref.shape == (12, 1280) and extract.engine == "onnxruntime"
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
