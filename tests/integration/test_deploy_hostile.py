"""Issue 18, server items 1-9: decompression bombs, extreme aspect ratios, repeated v2 outputs, slow
clients, health behind decoding, hang-ups mid-upload, non-finite outputs, memory of replaced
models, JSON answers to what h11 refuses. Against a real `cvm serve` (uvicorn, free port) except
where an object inside the process must be looked at (weak references, the decode budget)."""

from __future__ import annotations

import base64
import gc
import inspect
import io
import json
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import ADMIN_TOKEN, encode, generated_images, trained_store
from PIL import Image

from bench.reliability.common import Server, running_server
from bench.reliability.hostile import bmp_rle, png_strip, webp_bomb
from cvm_edge.preprocess import Preprocessing, resize_crop, resized_size
from deploy.bundle import current_bundle_dir

V2 = "/v2/models/cvm/infer"
UNITS = Path(__file__).resolve().parents[2] / "firmware_notes" / "systemd"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("hostile") / "w")


@pytest.fixture(scope="module")
def server(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("hostile-log") / "server.log"
    args = ["--workdir", str(workdir), "--threads", "1", "--request-timeout", "1", "--max-connections", "8"]
    with running_server(args, log) as s:
        yield s


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _v2_bytes(images: list[bytes], **extra: Any) -> dict[str, Any]:
    data = [base64.b64encode(b).decode() for b in images]
    return {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}], **extra}


def _assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"}, body
    for w in words:
        assert w in body["error"], body


def _metric(client: httpx.Client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# ----- 1. decompression bombs ------------------------------------------------------------------------
def test_a_webp_bomb_is_refused_from_its_header_on_every_path(client: httpx.Client) -> None:
    bomb = webp_bomb(4600, 4600)  # 38 bytes that decode to 21 MP (about 360 MB on the way to RGB)
    assert len(bomb) < 64
    _assert_error(client.post("/v1/classify", content=bomb), 413, "4600x4600", "decode memory")
    _assert_error(client.post("/v1/classify", files={"file": ("b.webp", bomb, "image/webp")}), 413, "decode memory")
    _assert_error(client.post(V2, json=_v2_bytes([bomb] * 4)), 413, "file 1 (element 0)", "decode memory")


def test_the_pixels_of_one_request_are_bounded_together(client: httpx.Client) -> None:
    """Each image fits alone (16 MP, 290 MB estimated), eight of them do not (128 MP > 120 MP)."""
    image = webp_bomb(4000, 4000)
    _assert_error(client.post(V2, json=_v2_bytes([image] * 8)), 413, "per request")
    files = [("file", (f"{i}.webp", image, "image/webp")) for i in range(8)]
    _assert_error(client.post("/v1/classify", files=files), 413, "per request")


def test_decodes_in_flight_share_one_memory_budget() -> None:
    """Six threads decode at once; the estimated memory reserved never exceeds the budget, so at
    most two of these images are decoded at a time."""
    from deploy.imagedecode import DecodeLimits, ImageDecoder, decode_cost_bytes

    decoder = ImageDecoder(DecodeLimits(memory_bytes=64 << 20))
    image = webp_bomb(1200, 1200)  # about 25 MB estimated
    prep = Preprocessing(image_size=32)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            assert decoder.decode_all([(None, image)] * 3, prep).shape == (3, 32, 32, 3)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cost = decode_cost_bytes(Image.open(io.BytesIO(image)))
    assert decoder.budget.peak == 2 * cost  # two at once, never three (3 * cost > 64 MiB)
    assert decoder.budget.in_use == 0


# ----- 2. aspect ratios ------------------------------------------------------------------------------
def test_extreme_aspect_ratios_get_4xx_not_500(client: httpx.Client) -> None:
    for h in (200_000, 39_999_999):
        strip = png_strip(1, h)
        r = client.post("/v1/classify", content=strip, headers={"Content-Type": "image/png"})
        _assert_error(r, 422, f"1x{h}", "aspect ratio")
        _assert_error(client.post(V2, json=_v2_bytes([strip])), 422, "aspect ratio")
    ok = client.post("/v1/classify", content=encode(Image.new("RGB", (900, 10), (9, 9, 9)), "PNG"))
    assert ok.status_code == 200, ok.text  # 90:1 is still an image


def test_resize_crops_before_it_upscales_a_strip() -> None:
    """A 1 x 40 M strip used to resize to 32 x 1.28 G first (OverflowError in Pillow)."""
    prep = Preprocessing(image_size=32)
    strip = Image.new("RGB", (1, 39_999_999 // 4), (10, 200, 30))
    out = resize_crop(strip, prep)
    assert out.shape == (32, 32, 3) and (out == (10, 200, 30)).all()


def test_resize_of_normal_images_is_unchanged() -> None:
    """Below the intermediate-size bound the resize-then-crop is the one models were trained with."""
    rng = np.random.default_rng(3)
    for size, (w, h) in ((32, (48, 64)), (32, (12, 300)), (224, (640, 480)), (224, (3000, 400)), (64, (1, 1))):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        prep = Preprocessing(image_size=size)
        nw, nh = resized_size(w, h, prep)
        left, top = (nw - size) // 2, (nh - size) // 2
        expected = np.asarray(
            img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))
        )
        assert np.array_equal(resize_crop(img, prep), expected), (size, w, h)


# ----- 3. v2 outputs ---------------------------------------------------------------------------------
def test_repeated_or_unknown_v2_outputs_are_refused(client: httpx.Client) -> None:
    png = generated_images()["rgb.png"][0]
    repeated = _v2_bytes([png], outputs=[{"name": "embedding"}] * 3 + [{"name": "label"}])
    _assert_error(client.post(V2, json=repeated), 400, "embedding", "more than once")
    _assert_error(client.post(V2, json=_v2_bytes([png], outputs=[{"name": "x" * 5000}])), 400, "unknown output")
    ok = client.post(V2, json=_v2_bytes([png], outputs=[{"name": "label"}, {"name": "logits"}]))
    assert ok.status_code == 200 and [o["name"] for o in ok.json()["outputs"]] == ["label", "logits"]


# ----- 4. slow clients -------------------------------------------------------------------------------
def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def _json_answer(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_slow_headers_and_slow_bodies_get_408_and_the_socket_back(server: Server) -> None:
    with _connect(server) as s:  # headers that never end
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
        t0 = time.monotonic()
        status, headers, body = _json_answer(_read_all(s))
        assert status == 408 and "headers" in body["error"] and headers["content-type"] == "application/json"
        assert time.monotonic() - t0 < 4
    with _connect(server) as s:  # a body that never ends
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\x89PNG" * 10)
        status, _, body = _json_answer(_read_all(s))
        assert status == 408 and "body" in body["error"]


def test_connections_over_the_limit_are_closed_at_once(server: Server) -> None:
    """Limit 8: of 12 idle connections at least 4 get a JSON 503 at once; the others the 408 of the
    header timeout (1 s here). Then the server answers again."""
    socks = [_connect(server) for _ in range(12)]
    t0 = time.monotonic()
    try:
        answers = []
        for s in socks:
            s.settimeout(4)
            answers.append((_json_answer(_read_all(s)), time.monotonic() - t0))
    finally:
        for s in socks:
            s.close()
    refused = [a for (a, _) in answers if a[0] == 503]
    assert len(refused) >= 4 and all("too many open connections" in a[2]["error"] for a in refused)
    assert {a[0] for (a, _) in answers} == {503, 408}
    assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200


def test_the_shipped_unit_raises_the_open_file_limit() -> None:
    unit = (UNITS / "cvm-serve.service").read_text()
    limits = [int(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert limits and limits[0] >= 65536


# ----- 5. health never waits for decoding ------------------------------------------------------------
def test_health_and_metrics_run_on_the_event_loop(workdir: Path) -> None:
    """Coroutine endpoints run on the event loop, never in a thread pool that decoding fills."""
    from deploy.server import ServerSettings, create_app

    app = create_app(ServerSettings(bundle=current_bundle_dir(workdir)))
    endpoints = {getattr(r, "path", ""): getattr(r, "endpoint", None) for r in app.routes}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready", "/v2", "/metrics"):
        assert inspect.iscoroutinefunction(endpoints[path]), path


def test_slow_python_decoded_bmp_rle_is_bounded(client: httpx.Client) -> None:
    _assert_error(client.post("/v1/classify", content=bmp_rle(600, 600)), 415, "BMP", "PNG, JPEG or WebP")
    ok = client.post("/v1/classify", content=bmp_rle(256, 256))
    assert ok.status_code == 200, ok.text


# ----- 6. hang-ups -----------------------------------------------------------------------------------
def test_a_client_hanging_up_mid_upload_is_a_disconnect_not_a_500(server: Server, client: httpx.Client) -> None:
    before = _metric(client, "cvm_client_disconnects_total")
    with _connect(server) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\x89PNG" * 250)
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while _metric(client, "cvm_client_disconnects_total") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(client, "cvm_client_disconnects_total") == before + 1
    text = client.get("/metrics").text
    assert 'route="/v1/classify",status="499"' in text and 'status="500"' not in text
    assert "Traceback" not in server.log() and "unhandled error" not in server.log()


# ----- 7. non-finite outputs -------------------------------------------------------------------------
def test_finite_inputs_that_overflow_the_model_get_422_not_null(client: httpx.Client) -> None:
    x = np.full((1, 3, 32, 32), 3.0e38, np.float32)
    x[0, :, ::2] *= -1
    req = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    _assert_error(client.post(V2, json=req), 422, "not finite")


# ----- 8. replaced models are freed ------------------------------------------------------------------
def test_models_replaced_by_forced_reloads_under_load_are_freed(workdir: Path) -> None:
    """Every model a forced reload replaced is gone once its requests are done (no thread keeps the
    last request's closure), and the freed heap is handed back without a poller running."""
    from fastapi.testclient import TestClient

    from deploy.server import ServerSettings, create_app

    settings = ServerSettings(bundle=current_bundle_dir(workdir), admin_token=ADMIN_TOKEN, poll_interval_s=0)
    app = create_app(settings)
    holder = app.state.holder
    image = generated_images()["rgb.jpg"][0]
    replaced: list[weakref.ref[Any]] = []
    with TestClient(app) as c:
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                assert c.post("/v1/classify", content=image).status_code == 200

        clients = [threading.Thread(target=load) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            for _ in range(6):
                replaced.append(weakref.ref(holder.current.predictor))
                r = c.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                assert r.status_code == 200, r.text
                assert c.post(V2, json=_v2_bytes([image])).status_code == 200
        finally:
            stop.set()
            for t in clients:
                t.join()
        alive = [ref for ref in replaced if ref() is not None]
        gc.collect()
        assert not [ref for ref in replaced if ref() is not None], "a replaced model is still referenced"
        assert not alive, f"{len(alive)} replaced models outlived their requests until a gc run"
        assert holder._retired == []  # all gone: the heap was trimmed


# ----- 9. what h11 refuses ---------------------------------------------------------------------------
def test_headers_over_16_kib_get_a_json_400(server: Server) -> None:
    """h11 has this limit of its own; llhttp (httptools, the default parser) has none: the protocol counts."""
    with _connect(server) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
        status, headers, body = _json_answer(_read_all(s))
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["error"].startswith("invalid HTTP request") and "16384" in body["error"], body
    with _connect(server) as s:  # just under the limit is an ordinary request
        s.sendall(
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * 15_000 + b"\r\n\r\n"
        )
        status, _, body = _json_answer(_read_all(s))
    assert status == 200 and body == {"live": True}


def test_requests_h11_refuses_get_a_json_400(server: Server) -> None:
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        with _connect(server) as s:
            s.sendall(raw)
            status, headers, body = _json_answer(_read_all(s))
        assert status == 400 and headers["content-type"] == "application/json"
        assert body["error"].startswith("invalid HTTP request"), body
