"""`cvm export` and the Predictor: parity gates, bundle publishing, verification, same preprocessing."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import PHOTOS, generated_images, trained_store, update, write_folders

from conftest import run_cli
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.errors import ModelLoadError
from cvm_edge.loading import model_from_checkpoint
from cvm_edge.preprocess import load_pixels, normalise
from deploy import cpu as cpu_mod
from deploy import export as export_mod
from deploy.bundle import current_bundle_dir, load_bundle, sha256_bytes
from deploy.cpu import cpu_flags, resolve_int8_weights, suited_int8_weights
from deploy.predictor import Predictor, PredictorOptions, resolve_providers


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("export") / "w")


def _manifest(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "bundles" / name / "manifest.json").read_text())


def test_update_exports_and_publishes_fp32_bundle(store: Path) -> None:
    bundle = current_bundle_dir(store)
    assert bundle is not None and bundle.name == "v000002"
    m = _manifest(store, "v000002")
    assert m["version"] == 2 and m["precision"] == "fp32" and m["opset"] >= 17
    assert m["classes"] == ["T-shirt/top", "Trouser"] and m["class_rows"] == [0, 1]
    assert m["image_size"] == 32 and m["mean"] == [0.5, 0.5, 0.5] and m["std"] == [0.5, 0.5, 0.5]
    assert m["interpolation"] == "bilinear" and m["crop_pct"] == 1.0
    assert m["table_fingerprint"] == CheckpointStore(store).load().table.fingerprint
    assert m["logit_scale"] > 1 and m["created_at"]
    assert m["model_sha256"] == sha256_bytes((bundle / "model.onnx").read_bytes())
    assert (bundle / "concepts.npz").is_file()
    p = m["parity"]
    assert p["passed"] and p["n_images"] >= 64
    assert p["max_abs_embedding_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    assert p["images"]["val"] > 0 and p["images"]["buffer"] > 0
    assert not [e for e in (store / "bundles").iterdir() if e.name.startswith(".tmp-")]


def test_export_fp16_and_int8_meet_their_gates(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = {}
    for precision, name in (("fp16", "v000002-fp16"), ("int8", "v000002-int8"), ("fp32", "v000002.2")):
        assert run_cli("export", "--workdir", str(store), "--precision", precision) == 0
        assert f"published bundle {name} ({precision}" in capsys.readouterr().out
        assert current_bundle_dir(store) == store / "bundles" / name
        figures[precision] = _manifest(store, name)["parity"]
    fp16, int8, fp32 = figures["fp16"], figures["int8"], figures["fp32"]
    assert fp32["max_abs_embedding_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0
    assert fp16["min_embedding_cosine"] >= 0.999 and fp16["top1_agreement"] >= 0.995
    assert int8["top1_agreement"] >= 0.97 and int8["val_accuracy_drop_points"] <= 1.0
    assert int8["calibration"]["source"] == "replay buffer" and int8["calibration"]["images"] > 0
    # auto: weights whose int8 kernels are fast and exact on this CPU, so the Predictor has no warning
    assert int8["calibration"]["weights"] in suited_int8_weights(platform.machine(), cpu_flags())
    assert int8["calibration"]["weights_chosen_by"] == "auto (this CPU)"
    assert Predictor(store / "bundles" / "v000002-int8").int8_warning is None
    assert all(f["n_images"] >= 64 and f["passed"] for f in figures.values())
    # the int8 model really is quantised, and each bundle loads and answers
    sizes = {
        k: (store / "bundles" / n / "model.onnx").stat().st_size
        for k, n in (("fp32", "v000002"), ("int8", "v000002-int8"))
    }
    assert sizes["int8"] < sizes["fp32"] / 2
    print(json.dumps({k: {g: v[g] for g in export_mod.GATES[k]} for k, v in figures.items()}))


def test_an_int8_bundle_served_on_a_cpu_its_weights_do_not_suit_warns_at_load(
    store: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kind asked for is recorded; served where it does not suit (U8S8 on x86 without VNNI:
    saturates; U8U8 on VNNI: slow) the bundle still answers, and says so at load with the way out.
    The export runs this CPU's own kind (its gate must pass here); the serving CPU is stood in for."""
    kind = resolve_int8_weights("auto")
    result = export_mod.export_locked(store, 2, export_mod.ExportOptions(precision="int8", int8_weights=kind))
    calibration = result.manifest["parity"]["calibration"]
    assert calibration["weights"] == kind and calibration["weights_chosen_by"] == "asked"
    unsuited = {"int8": {"avx2"}, "uint8": {"avx2", "avx512_vnni"}}[kind]
    monkeypatch.setattr(cpu_mod.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_mod, "cpu_flags", lambda: frozenset(unsuited))
    with caplog.at_level("WARNING", logger="deploy.predictor"):
        predictor = Predictor(result.path)
    assert predictor.int8_warning is not None and "cvm export --precision int8" in predictor.int8_warning
    assert predictor.int8_warning in caplog.text
    predictor.warmup()


def test_opset_17_goes_through_the_torchscript_exporter(store: Path, tmp_path: Path) -> None:
    result = export_mod.export_locked(store, 2, export_mod.ExportOptions(opset=17))
    assert result.manifest["opset"] == 17 and "torchscript" in result.manifest["exporter"]
    assert result.manifest["parity"]["max_abs_embedding_diff"] <= 1e-4
    Predictor(result.path).warmup()


def test_failed_gate_publishes_nothing(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = current_bundle_dir(store)
    entries = sorted(p.name for p in (store / "bundles").iterdir())
    monkeypatch.setitem(export_mod.GATES, "fp16", {"min_embedding_cosine": 1.5, "top1_agreement": 0.995})
    with pytest.raises(export_mod.ExportGateError, match=r"fp16 parity gate failed: min_embedding_cosine"):
        export_mod.export_locked(store, None, export_mod.ExportOptions(precision="fp16"))
    assert current_bundle_dir(store) == before
    assert sorted(p.name for p in (store / "bundles").iterdir()) == entries
    # through the CLI the failure is one line naming the figure, exit 1
    assert run_cli("export", "--workdir", str(store), "--precision", "fp16") == 1


def test_export_usage_errors(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("export", "--workdir", str(tmp_path / "nothing")) == 2
    assert run_cli("export", "--workdir", str(store), "--version", "1") == 2  # v1 has learned nothing
    assert "has not learned any class" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli("export", "--workdir", str(store), "--opset", "16")
    assert exc.value.code == 2


def test_parity_images_are_made_up_to_64_and_say_so(store: Path) -> None:
    ckpt = CheckpointStore(store).load()
    small = dataclasses.replace(
        ckpt,
        val=ckpt.val.subset(np.arange(5)),
        buffer=dataclasses.replace(
            ckpt.buffer,
            pixels=ckpt.buffer.pixels[:7],
            labels=ckpt.buffer.labels[:7],
            logits=ckpt.buffer.logits[:7],
            tasks=ckpt.buffer.tasks[:7],
        ),
    )
    imgs = export_mod.parity_images(small, 64)
    assert len(imgs.pixels) >= 64 and imgs.n_val == 5
    assert imgs.info["augmented"] == len(imgs.pixels) - 12 and "flip" in imgs.info["note"]
    np.testing.assert_array_equal(imgs.pixels[12], small.val.pixels[0][:, ::-1])
    assert "note" not in export_mod.parity_images(ckpt, 64).info


def _torch_logits(workdir: Path, data: bytes) -> np.ndarray:
    ckpt = CheckpointStore(workdir).load(2)
    model = model_from_checkpoint(ckpt)
    x = normalise(load_pixels(data, ckpt.prep), ckpt.prep)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return logits[:, list(ckpt.seen)]


def test_predictor_matches_torch_on_the_same_file(store: Path, tmp_path: Path) -> None:
    files = {name: data for name, (data, _) in generated_images().items()}
    sample_png = next((write_folders(tmp_path / "d", [1], 1) / "trouser").iterdir())
    files["sample.png"] = sample_png.read_bytes()
    if PHOTOS.is_dir():
        files["photo.jpg"] = (PHOTOS / "golf_ball_03.jpg").read_bytes()
    predictor = Predictor(store / "bundles" / "v000002", PredictorOptions(intra_op_threads=1))
    for name, data in files.items():
        expected = _torch_logits(store, data)
        got = predictor.run_images([data]).logits
        assert np.abs(got - expected).max() < 1e-4, name
    # and the Predictor's labels are `cvm predict`'s labels
    assert predictor.classify([files["sample.png"]], 1)[0][0]["label"] == "Trouser"


def test_tampered_or_broken_bundle_is_refused(store: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(store / "bundles" / "v000002", bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        Predictor(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="manifest"):
        load_bundle(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match="not a bundle"):
        Predictor(bad)


def test_provider_list_is_explicit_and_fallback_is_logged(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="deploy.predictor"):
        p = Predictor(store / "bundles" / "v000002", PredictorOptions(providers=("cuda", "cpu"), intra_op_threads=1))
    assert p.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider requested but this onnxruntime build lacks it" in caplog.text
    assert "fallback" in caplog.text
    opts = PredictorOptions(providers=("tensorrt", "cuda"), trt_cache_dir=store / "trt", max_batch=8)
    full = resolve_providers(opts, 224, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    trt, cuda, cpu = full
    assert isinstance(trt, tuple) and trt[0] == "TensorrtExecutionProvider"
    assert trt[1]["trt_engine_cache_enable"] and trt[1]["trt_profile_max_shapes"] == "input:8x3x224x224"
    assert isinstance(cuda, tuple) and cuda[0] == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"


def test_cuda_provider_runs_in_fp32_not_tf32() -> None:
    """onnxruntime's CUDA provider uses TF32 unless told otherwise, which breaks the fp32 gate's
    1e-4 embedding figure on an H200 (bench/results/gpu_providers.json)."""
    full = resolve_providers(
        PredictorOptions(providers=("cuda",)), 224, ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert full[0] == ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": 0})
    assert full[1] == "CPUExecutionProvider"


def test_update_no_export_leaves_the_bundle_alone(store: Path, tmp_path: Path) -> None:
    before = current_bundle_dir(store)
    data = write_folders(tmp_path / "d", [2], 30)
    assert update(store, data, "--epochs", "1", "--no-export", "--force", "--balance-epochs", "0") == 0
    assert CheckpointStore(store).latest() == 3
    assert current_bundle_dir(store) == before
    assert not (store / "bundles" / "v000003").exists()


def _cli_subprocess(env_fault: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CVM_FAULT_AT": env_fault}
    return subprocess.run(
        [sys.executable, "-m", "cvm_edge.cli", "-q", *argv], capture_output=True, text=True, env=env, timeout=300
    )


def test_power_cut_during_export_leaves_the_old_bundle_current(store: Path) -> None:
    """firmware_notes/power-loss.md, checked: the process dies (os._exit, like a power cut) at each
    step of publishing; CURRENT keeps naming a complete bundle, and the next export cleans up."""
    root = store / "bundles"
    before = current_bundle_dir(store)
    assert before is not None
    for point in ("bundle_files_written", "before_rename", "before_bundle_pointer"):
        proc = _cli_subprocess(f"{point}:exit", "export", "--workdir", str(store), "--version", "2", "--opset", "17")
        assert proc.returncode == 137, proc.stderr
        assert current_bundle_dir(store) == before, point
        Predictor(before)  # still complete and verified
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
        if point == "before_bundle_pointer":  # renamed into place, complete, but not current
            assert not leftovers
            orphan = max((p for p in root.iterdir() if p.name.startswith("v000002.")), key=lambda p: p.stat().st_mtime)
            assert load_bundle(orphan).manifest["parity"]["passed"]
        else:
            assert leftovers, point  # the temp dir stays until the next writer takes the lock
    result = export_mod.export_locked(store, 2, export_mod.ExportOptions())
    assert current_bundle_dir(store) == result.path
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_power_cut_between_checkpoint_and_bundle_of_an_update(store: Path, tmp_path: Path) -> None:
    """`cvm update` dies after LATEST moved but before the bundle is published: the new checkpoint is
    current, the server's bundle is the old one, and `cvm export` catches up."""
    before = current_bundle_dir(store)
    latest = CheckpointStore(store).latest()
    data = write_folders(tmp_path / "d", [3], 20)
    argv = ("update", "--workdir", str(store), "--data", str(data), "--epochs", "1", "--force", "--no-progress")
    proc = _cli_subprocess("bundle_files_written:exit", *argv, "--balance-epochs", "0")
    assert proc.returncode == 137, proc.stderr
    assert CheckpointStore(store).latest() == latest + 1
    assert current_bundle_dir(store) == before
    assert run_cli("-q", "export", "--workdir", str(store)) == 0
    assert load_bundle(current_bundle_dir(store)).version == latest + 1  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["percentile", "minmax", "entropy"])
def test_int8_calibration_takes_any_number_of_images(store: Path, tmp_path: Path, method: str) -> None:
    ckpt = CheckpointStore(store).load(2)
    fp32 = (store / "bundles" / "v000002" / "model.onnx").read_bytes()
    calibration = normalise(ckpt.buffer.pixels[:17], ckpt.prep)  # not a multiple of any batch size
    int8 = export_mod.to_int8(fp32, calibration, method, tmp_path)
    x = normalise(ckpt.val.pixels, ckpt.prep)
    ref, got = export_mod.onnx_outputs(fp32, x, 8), export_mod.onnx_outputs(int8, x, 8)
    assert export_mod.parity_figures(ref, got, np.zeros(0, np.int64))["min_embedding_cosine"] > 0.99
