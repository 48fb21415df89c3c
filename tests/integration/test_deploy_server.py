"""A real `cvm serve` process (uvicorn, free port): classification, the v2 protocol, bad input,
metrics, admin reload, hot reload under load, refusal of tampered bundles, and the acceptance
test: `cvm update` while a client loops, the new version served within 2 s with no failed request."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import (
    ADMIN_TOKEN,
    encode,
    generated_images,
    photos,
    trained_store,
    update,
    write_folders,
)
from PIL import Image

from bench.reliability.common import running_server
from conftest import run_cli
from cvm_edge.fsutil import write_pointer
from deploy.bundle import current_bundle_dir, seal_bundle
from deploy.predictor import Predictor, PredictorOptions

CLASSES = ["T-shirt/top", "Trouser"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("serve") / "w")


@pytest.fixture(scope="module")
def server(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(["--workdir", str(workdir), "--threads", "1"], log, env={"CVM_ADMIN_TOKEN": ADMIN_TOKEN}) as s:
        yield s


@pytest.fixture()
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _serving(client: httpx.Client) -> str:
    return str(client.get("/v1/model").json()["model_version"])


def _check_predictions(preds: list[dict[str, Any]], k: int = 2) -> None:
    assert [p["label"] for p in preds] != [] and len(preds) == k
    assert {p["label"] for p in preds} <= set(CLASSES)
    assert all(0.0 <= p["score"] <= 1.0 for p in preds)
    assert preds == sorted(preds, key=lambda p: -p["score"])


# ----- classification ---------------------------------------------------------------------------
def test_classifies_the_300_real_photos(client: httpx.Client, workdir: Path) -> None:
    files = photos()
    reference = Predictor(workdir / "bundles" / "v000002", PredictorOptions(intra_op_threads=1))
    for i, path in enumerate(files):
        data = path.read_bytes()
        r = client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        assert set(body) == {"model_version", "predictions", "latency_ms"} and body["latency_ms"] > 0
        _check_predictions(body["predictions"])
        if i % 30 == 0:  # the server answers what the Predictor answers for the same bytes
            expected = reference.classify([data], 2)[0]
            assert [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
            assert np.allclose([p["score"] for p in body["predictions"]], [p["score"] for p in expected], atol=1e-5)
    # several files in one multipart request: answered in order
    batch = files[::60]
    r = client.post("/v1/classify", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in batch])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [p.name for p in batch]
    for p, res in zip(batch, results, strict=True):
        single = client.post("/v1/classify", content=p.read_bytes()).json()["predictions"]
        assert [q["label"] for q in res["predictions"]] == [q["label"] for q in single]


def test_classifies_generated_images_of_every_format_and_mode(client: httpx.Client) -> None:
    for name, (data, ctype) in generated_images().items():
        r = client.post("/v1/classify?top_k=1", content=data, headers={"Content-Type": ctype})
        assert r.status_code == 200, (name, r.text)
        _check_predictions(r.json()["predictions"], k=1)
        r = client.post("/v1/classify", files={"file": (name, data, ctype)})  # one multipart file
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2, (name, r.text)


# ----- bad input --------------------------------------------------------------------------------
def _bad_cases() -> list[tuple[str, str, str, dict[str, Any], int]]:
    """(name, method, path, httpx keyword arguments, expected status)."""
    png = generated_images()["rgb.png"][0]
    jpeg = generated_images()["rgb.jpg"][0]
    huge = encode(Image.new("L", (8000, 6000)), "PNG")  # 48 MP, a few kB compressed
    gif = encode(Image.new("RGB", (8, 8)), "GIF")
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    b64 = base64.b64encode
    many = [("file", (f"{i}.png", png, "image/png")) for i in range(33)]
    v2 = "/v2/models/cvm/infer"
    return [
        ("body over 10 MiB", "POST", "/v1/classify", {"content": b"\xff" * (10 * 2**20 + 1)}, 413),
        ("image over the pixel limit", "POST", "/v1/classify", {"content": huge}, 413),
        (
            "text/plain body",
            "POST",
            "/v1/classify",
            {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        ("json body", "POST", "/v1/classify", {"json": {"image": "x"}}, 415),
        ("GIF", "POST", "/v1/classify", {"content": gif, "headers": {"Content-Type": "image/gif"}}, 415),
        ("GIF as octet-stream", "POST", "/v1/classify", {"content": gif}, 415),
        ("TIFF in a multipart part", "POST", "/v1/classify", {"files": {"file": ("a.tif", tiff, "image/tiff")}}, 415),
        ("random bytes", "POST", "/v1/classify", {"content": np.random.default_rng(1).bytes(5000)}, 415),
        ("truncated JPEG", "POST", "/v1/classify", {"content": jpeg[: len(jpeg) // 3]}, 422),
        ("truncated PNG", "POST", "/v1/classify", {"content": png[:200]}, 422),
        ("empty body", "POST", "/v1/classify", {"content": b""}, 422),
        (
            "multipart without a file part",
            "POST",
            "/v1/classify",
            {"data": {"note": "x"}, "files": {"other": ("a.png", png, "image/png")}},
            422,
        ),
        ("empty file part", "POST", "/v1/classify", {"files": {"file": ("e.png", b"", "image/png")}}, 422),
        (
            "broken multipart",
            "POST",
            "/v1/classify",
            {"content": b"--x\r\nnonsense", "headers": {"Content-Type": "multipart/form-data; boundary=y"}},
            400,
        ),
        ("33 files", "POST", "/v1/classify", {"files": many}, 400),
        ("top_k = 0", "POST", "/v1/classify?top_k=0", {"content": png}, 422),
        ("top_k not a number", "POST", "/v1/classify?top_k=abc", {"content": png}, 422),
        ("GET on classify", "GET", "/v1/classify", {}, 405),
        ("unknown path", "GET", "/v1/nothing", {}, 404),
        ("unknown model", "GET", "/v2/models/other", {}, 404),
        ("infer on unknown model", "POST", "/v2/models/other/infer", {"json": {}}, 404),
        ("infer body not JSON", "POST", v2, {"content": b"{nope"}, 400),
        ("infer without inputs", "POST", v2, {"json": {"id": "1"}}, 400),
        (
            "infer FP32 wrong element count",
            "POST",
            v2,
            {"json": {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 10}]}},
            400,
        ),
        (
            "infer FP32 wrong image size",
            "POST",
            v2,
            {"json": {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}},
            400,
        ),
        (
            "infer FP32 NaN",
            "POST",
            v2,
            {
                "content": json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "input",
                                "shape": [1, 3, 32, 32],
                                "datatype": "FP32",
                                "data": [float("nan")] * 3072,
                            }
                        ]
                    }
                ).encode()
            },
            422,
        ),
        (
            "infer INT8 datatype",
            "POST",
            v2,
            {"json": {"inputs": [{"name": "input", "shape": [1], "datatype": "INT8", "data": [1]}]}},
            400,
        ),
        (
            "infer BYTES bad base64",
            "POST",
            v2,
            {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}},
            422,
        ),
        (
            "infer BYTES not an image",
            "POST",
            v2,
            {
                "json": {
                    "inputs": [
                        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"plain text").decode()]}
                    ]
                }
            },
            415,
        ),
        (
            "infer unknown output",
            "POST",
            v2,
            {
                "json": {
                    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(png).decode()]}],
                    "outputs": [{"name": "nope"}],
                }
            },
            400,
        ),
        ("reload without a token", "POST", "/v1/admin/reload", {}, 401),
        ("reload with a wrong token", "POST", "/v1/admin/reload", {"headers": {"Authorization": "Bearer wrong"}}, 401),
    ]


def test_bad_input_gets_its_status_and_the_server_stays_up(client: httpx.Client) -> None:
    cases = _bad_cases()
    assert len(cases) >= 15
    for name, method, path, kwargs, status in cases:
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], (name, body)
        assert client.get("/v2/health/live").status_code == 200, name
    good = client.post("/v1/classify", content=generated_images()["rgb.png"][0])
    assert good.status_code == 200
    metrics = client.get("/metrics").text
    for status in (400, 401, 404, 405, 413, 415, 422):
        assert f'cvm_errors_total{{status="{status}"}}' in metrics


# ----- protocol endpoints --------------------------------------------------------------------------
def test_open_inference_protocol_v2(client: httpx.Client, workdir: Path) -> None:
    version = _serving(client)
    assert client.get("/v2").json()["name"] == "cvm-edge"
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/cvm/ready").json() == {"name": "cvm", "ready": True}
    meta = client.get("/v2/models/cvm").json()
    assert meta["name"] == "cvm" and meta["versions"] == [version] and meta["platform"] == "onnxruntime_onnx"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in meta["inputs"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 2]} in meta["outputs"]

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    req = {
        "id": "req-7",
        "inputs": [{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}],
    }
    r = client.post("/v2/models/cvm/infer", json=req)
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["model_name"] == "cvm" and ans["model_version"] == version and ans["id"] == "req-7"
    outs = {o["name"]: o for o in ans["outputs"]}
    assert set(outs) == {"logits", "probabilities", "embedding", "label"}
    assert outs["logits"]["datatype"] == "FP32" and outs["logits"]["shape"] == [2, 2]
    assert outs["embedding"]["shape"] == [2, 384] and len(outs["embedding"]["data"]) == 768
    assert outs["label"]["datatype"] == "BYTES" and outs["label"]["shape"] == [2]
    local = Predictor(current_bundle_dir(workdir)).run(x)  # type: ignore[arg-type]
    np.testing.assert_allclose(np.asarray(outs["logits"]["data"]).reshape(2, 2), local.logits, atol=1e-4)
    # nested JSON data is accepted too
    req["inputs"][0]["data"] = x.tolist()
    assert client.post("/v2/models/cvm/infer", json=req).json()["outputs"][0]["data"] == outs["logits"]["data"]

    imgs = [generated_images()["rgb.jpg"][0], generated_images()["16bit.png"][0]]
    req2 = {
        "inputs": [
            {"name": "image", "shape": [2], "datatype": "BYTES", "data": [base64.b64encode(b).decode() for b in imgs]}
        ],
        "outputs": [{"name": "label"}, {"name": "probabilities"}],
    }
    r = client.post("/v2/models/cvm/infer", json=req2)
    assert r.status_code == 200, r.text
    ans = r.json()
    assert "id" not in ans and [o["name"] for o in ans["outputs"]] == ["label", "probabilities"]
    for img, label in zip(imgs, ans["outputs"][0]["data"], strict=True):
        assert client.post("/v1/classify", content=img).json()["predictions"][0]["label"] == label
    assert np.allclose(np.asarray(ans["outputs"][1]["data"]).reshape(2, 2).sum(1), 1.0, atol=1e-5)


def test_model_info_and_metrics(client: httpx.Client) -> None:
    info = client.get("/v1/model").json()
    assert info["ready"] and info["classes"] == CLASSES and info["checkpoint_version"] >= 2
    assert info["manifest"]["model_sha256"] and info["manifest"]["parity"]["passed"]
    assert info["history"] and info["history"][0]["new_class_names"] == CLASSES
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["warnings"] == []  # an fp32 bundle suits every CPU
    text = client.get("/metrics").text
    assert "# TYPE cvm_requests_total counter" in text
    assert 'cvm_requests_total{method="GET",route="/v1/model",status="200"}' in text
    assert 'cvm_request_latency_seconds_bucket{le="0.005",route="/v1/model"}' in text
    assert 'cvm_model_reloads_total{result="failure"}' in text
    assert f"cvm_model_version {float(info['checkpoint_version'])}" in text
    assert f'cvm_model_info{{bundle="{info["model_version"]}",precision="{info["precision"]}"}} 1.0' in text


def test_server_process_has_not_loaded_torch(server: Any) -> None:
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc on this system")
    text = maps.read_text()
    assert "onnxruntime" in text
    assert "libtorch" not in text and "/torch/" not in text


# ----- hot reload ---------------------------------------------------------------------------------
class LoopingClient:
    """Posts images in a loop from a thread; remembers every status and model version it got."""

    def __init__(self, url: str, image: bytes) -> None:
        self.url, self.image = url, image
        self.results: list[tuple[float, int, str | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                try:
                    r = c.post("/v1/classify", content=self.image)
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.results.append((time.time(), r.status_code, version))
                    if r.status_code != 200:
                        self.errors.append(r.text)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def __enter__(self) -> LoopingClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def first_seen(self, version: str) -> float | None:
        return next((t for t, _, v in self.results if v == version), None)


def _wait_for_version(client: httpx.Client, version: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _serving(client) == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"server did not switch to {version}: {client.get('/v1/model').json()}")


def test_hot_reload_of_two_bundles_under_load(server: Any, client: httpx.Client, workdir: Path) -> None:
    image = generated_images()["rgb.jpg"][0]  # not the shared photos: these tests must run without them
    before = _serving(client)
    with LoopingClient(server.url, image) as loop:
        time.sleep(0.3)
        for precision in ("fp16", "int8"):
            assert run_cli("-q", "export", "--workdir", str(workdir), "--precision", precision) == 0
            name = current_bundle_dir(workdir).name  # type: ignore[union-attr]
            _wait_for_version(client, name)
            time.sleep(0.3)
    assert loop.errors == [] and len(loop.results) > 10
    versions = [v for _, _, v in loop.results]
    assert versions[0] == before and versions[-1].endswith("-int8")  # type: ignore[union-attr]
    order = list(dict.fromkeys(versions))
    assert len(order) == 3 and order[1].endswith("-fp16")  # type: ignore[union-attr]


def test_tampered_bundle_is_refused_and_the_old_model_keeps_serving(
    server: Any, client: httpx.Client, workdir: Path
) -> None:
    serving = _serving(client)
    root = workdir / "bundles"
    good_pointer = (root / "CURRENT").read_text().strip()
    bad = root / "v000090"
    shutil.copytree(root / serving, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-100] ^= 0x55
    (bad / "model.onnx").write_bytes(bytes(data))
    broken = root / "v000091"
    shutil.copytree(root / serving, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((broken / "manifest.json").read_text())
    import hashlib

    manifest["model_sha256"] = hashlib.sha256(b"not an onnx model").hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    seal_bundle(broken)  # the manifest's own sha256 (manifest.sha256) follows the edit
    try:
        for name, expect in (("v000090", "sha256"), ("v000091", "onnxruntime cannot load it")):
            write_pointer(root / "CURRENT", name)
            deadline = time.monotonic() + 5
            info: dict[str, Any] = {}
            while time.monotonic() < deadline:
                info = client.get("/v1/model").json()
                if info["last_reload_error"] and info["last_reload_error"]["bundle"].endswith(name):
                    break
                time.sleep(0.05)
            assert info["last_reload_error"] and expect in info["last_reload_error"]["error"], info
            assert info["model_version"] == serving and info["last_reload_error"]["still_serving"] == serving
            r = client.post("/v1/classify", content=generated_images()["gray.png"][0])
            assert r.status_code == 200 and r.json()["model_version"] == serving
            forced = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert forced.status_code == 500 and expect in forced.json()["error"]
        assert "refused bundle" in server.log() and "sha256" in server.log()
        assert 'cvm_model_reloads_total{result="failure"}' in client.get("/metrics").text
    finally:
        write_pointer(root / "CURRENT", good_pointer)
    ok = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200 and ok.json()["model_version"] == good_pointer


def test_acceptance_update_is_served_within_2_s_with_no_failed_request(
    server: Any, client: httpx.Client, workdir: Path, tmp_path: Path
) -> None:
    data = write_folders(tmp_path / "new", [5, 7], 40)  # Sandal, Sneaker
    image = generated_images()["rgb.webp"][0]
    with LoopingClient(server.url, image) as loop:
        time.sleep(0.3)
        assert update(workdir, data, "--epochs", "1", "--force") == 0
        published = (workdir / "bundles" / "CURRENT").stat().st_mtime
        name = (workdir / "bundles" / "CURRENT").read_text().strip()
        deadline = time.time() + 5
        while loop.first_seen(name) is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    assert loop.errors == [], loop.errors[:3]
    first = loop.first_seen(name)
    assert first is not None, f"{name} never served"
    delay = first - published
    print(f"new version {name} served {delay:.3f} s after publish; {len(loop.results)} requests, 0 failed")
    assert delay <= 2.0
    info = client.get("/v1/model").json()
    assert info["model_version"] == name and set(info["classes"]) == {*CLASSES, "Sandal", "Sneaker"}
    assert len(info["history"]) == 2


def test_admin_endpoint_is_disabled_without_a_token(workdir: Path) -> None:
    """create_app builds independent apps (no module-level singletons): two in one process."""
    from fastapi.testclient import TestClient

    from deploy.server import ServerSettings, create_app

    bundle = current_bundle_dir(workdir)
    apps = [create_app(ServerSettings(bundle=bundle, admin_token=t)) for t in (None, "t0k")]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        r = a.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 404 and "disabled" in r.json()["error"]
        assert b.post("/v1/admin/reload", headers={"Authorization": "Bearer t0k"}).status_code == 200
        img = io.BytesIO()
        Image.new("RGB", (20, 20), (1, 2, 3)).save(img, "PNG")
        assert a.post("/v1/classify", content=img.getvalue()).status_code == 200
        assert "cvm_images_classified_total 1.0" in a.get("/metrics").text
        assert "cvm_images_classified_total 0.0" in b.get("/metrics").text


def test_starts_unready_without_a_bundle_then_follows_current(workdir: Path, tmp_path: Path) -> None:
    """In-process (create_app + TestClient): no bundle yet means 503 JSON errors, a bad pointer is
    reported once, and the first published bundle is picked up by the poller."""
    from fastapi.testclient import TestClient

    from deploy.server import ServerSettings, create_app

    store = tmp_path / "w"
    (store / "bundles").mkdir(parents=True)
    settings = ServerSettings(workdir=store, poll_interval_s=0.05)
    app = create_app(settings)
    with TestClient(app) as c:
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/models/cvm/ready").json()["ready"] is False
        r = c.post("/v1/classify", content=generated_images()["rgb.png"][0])
        assert r.status_code == 503 and "no model loaded" in r.json()["error"]
        assert c.get("/v1/model").json()["ready"] is False

        write_pointer(store / "bundles" / "CURRENT", "../../etc")
        time.sleep(0.3)
        info = c.get("/v1/model").json()
        assert "not a bundle name" in info["last_reload_error"]["error"]
        assert c.get("/metrics").text.count('cvm_model_reloads_total{result="failure"} 1.0') == 1  # once, not per poll

        shutil.copytree(workdir / "bundles" / "v000002", store / "bundles" / "v000002")
        write_pointer(store / "bundles" / "CURRENT", "v000002")
        deadline = time.monotonic() + 5
        while c.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.post("/v1/classify", content=generated_images()["rgb.png"][0]).json()["model_version"] == "v000002"
        assert c.get("/v1/model").json()["last_reload_error"] is None
