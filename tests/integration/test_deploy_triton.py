"""`cvm export --format triton`: the model repository layout and config.pbtxt, parsed against
Triton's own ModelConfig schema (tritonclient ships model_config_pb2) and checked against the
ONNX model's inputs and outputs, as Triton's ONNX Runtime backend does when it loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from deploy_helpers import trained_store
from google.protobuf import text_format

from conftest import run_cli
from cvm_edge.errors import UsageError
from deploy.bundle import load_bundle, sha256_bytes
from deploy.triton import TritonOptions, config_pbtxt, write_repository


def _load_model_config_pb2():  # type: ignore[no-untyped-def]
    """Triton's ``model_config_pb2`` from the tritonclient package, loaded as a file: importing
    ``tritonclient.grpc`` registers its service protos (package ``inference``), which kserve's own
    v2 protos, imported by tests/integration/test_deploy_clients.py in the same process, already define."""
    import importlib.util

    tritonclient = pytest.importorskip("tritonclient", reason="tritonclient (the [dev] extra) brings Triton's schema")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip("tritonclient[grpc] is not installed", allow_module_level=True)
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _load_model_config_pb2()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> tuple[Path, Path]:
    """(store, repository): one `cvm export --format triton` of the small trained store."""
    base = tmp_path_factory.mktemp("triton")
    store = trained_store(tmp_path_factory, fashion_table, base / "w")
    repo = base / "repo"
    argv = ["export", "--workdir", str(store), "--format", "triton", "--out", str(repo)]
    assert run_cli(*argv, "--max-batch-size", "16", "--queue-delay-us", "500") == 0
    return store, repo


def parse(path: Path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)  # unknown fields or wrong types raise
    return config


def test_repository_layout(exported: tuple[Path, Path]) -> None:
    store, repo = exported
    model_dir = repo / "cvm"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt", "manifest.json"]
    assert [p.name for p in (model_dir / "1").iterdir()] == ["model.onnx"]
    manifest = json.loads((model_dir / "manifest.json").read_text())
    bundle = load_bundle(store / "bundles" / manifest["name"])
    assert bundle.manifest == manifest  # the bundle this export published
    assert sha256_bytes((model_dir / "1" / "model.onnx").read_bytes()) == manifest["model_sha256"]
    assert (model_dir / "labels.txt").read_text().splitlines() == ["T-shirt/top", "Trouser"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".tmp-")]


def test_config_follows_tritons_schema_and_the_model(exported: tuple[Path, Path]) -> None:
    _, repo = exported
    config = parse(repo / "cvm" / "config.pbtxt")
    assert config.name == "cvm" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.version_policy.latest.num_versions == 1
    dt = model_config_pb2.DataType
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", dt.TYPE_FP32, [3, 32, 32])
    assert inp.format == model_config_pb2.ModelInput.FORMAT_NCHW
    outs = {o.name: o for o in config.output}
    assert list(outs["logits"].dims) == [2] and outs["logits"].label_filename == "labels.txt"
    assert list(outs["embedding"].dims) == [384] and not outs["embedding"].label_filename
    assert all(o.data_type == dt.TYPE_FP32 for o in config.output)
    # What Triton's ONNX Runtime backend checks on load: the same names, a dynamic batch axis
    # (max_batch_size > 0) and the rest of each shape equal to dims.
    sess = ort.InferenceSession(str(repo / "cvm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    declared = {inp.name: list(inp.dims), **{o.name: list(o.dims) for o in config.output}}
    for value in (*sess.get_inputs(), *sess.get_outputs()):
        assert value.type == "tensor(float)"
        assert isinstance(value.shape[0], str), f"{value.name} has a fixed batch axis"
        assert value.shape[1:] == declared.pop(value.name)
    assert not declared
    batch = np.zeros((16, 3, 32, 32), np.float32)  # a full dynamic batch runs
    logits, emb = sess.run(["logits", "embedding"], {"input": batch})
    assert logits.shape == (16, 2) and emb.shape == (16, 384)


def test_rewrite_replaces_our_model_and_refuses_a_foreign_folder(exported: tuple[Path, Path], tmp_path: Path) -> None:
    store, repo = exported
    bundle = store / "bundles" / json.loads((repo / "cvm" / "manifest.json").read_text())["name"]
    write_repository(bundle, repo, TritonOptions(max_batch_size=4))
    assert parse(repo / "cvm" / "config.pbtxt").max_batch_size == 4
    assert not [p for p in repo.iterdir() if p.name != "cvm"]
    foreign = tmp_path / "repo"
    (foreign / "cvm" / "1").mkdir(parents=True)
    (foreign / "cvm" / "config.pbtxt").write_text('name: "cvm"\n')
    with pytest.raises(UsageError, match="is not a cvm export; refusing to replace it"):
        write_repository(bundle, foreign, TritonOptions())
    assert (foreign / "cvm" / "config.pbtxt").read_text() == 'name: "cvm"\n'


def test_usage_errors(exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = exported
    assert run_cli("export", "--workdir", str(store), "--format", "triton") == 2
    assert "--format triton needs --out" in capsys.readouterr().err
    assert run_cli("export", "--workdir", str(store), "--out", str(tmp_path)) == 2
    assert "--out is for --format triton" in capsys.readouterr().err


def test_linear_head_embedding_width_is_variable() -> None:
    manifest = {
        "input": {"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]},
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, -1]},
        ],
    }
    config = model_config_pb2.ModelConfig()
    text_format.Parse(config_pbtxt(manifest, TritonOptions()), config)
    assert [list(o.dims) for o in config.output] == [[5], [-1]]
