"""The clients people already use against a real `cvm serve` process: tritonclient[http] and the
KServe SDK's v2 REST client. Binary tensor data in and out (FP32 and BYTES images), JSON, the
``/versions/{v}`` routes, gzip and deflate bodies, the server metadata; then malformed binary
and compressed bodies sent by hand (400/413/415 JSON, the server stays up) and /openapi.json."""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import generated_images, trained_store

from bench.reliability.common import running_server
from deploy.bundle import current_bundle_dir
from deploy.predictor import Predictor

tritonhttp = pytest.importorskip("tritonclient.http", reason="the dev extra installs tritonclient[http]")
kserve = pytest.importorskip("kserve", reason="the dev extra installs kserve")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip above

HEADER = "Inference-Header-Content-Length"
V2 = "/v2/models/cvm/infer"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("clients") / "w")


@pytest.fixture(scope="module")
def server(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("clients-log") / "server.log"
    with running_server(["--workdir", str(workdir), "--threads", "1"], log) as s:
        yield s


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Predictor:
    return Predictor(current_bundle_dir(workdir))  # type: ignore[arg-type]


@pytest.fixture()
def triton(server: Any) -> Iterator[Any]:
    client = tritonhttp.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture()
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _images() -> list[bytes]:
    g = generated_images()
    return [g["rgb.jpg"][0], g["16bit.png"][0], g["rgba.webp"][0]]


def _labels(client: httpx.Client, images: list[bytes]) -> list[str]:
    return [client.post("/v1/classify", content=b).json()["predictions"][0]["label"] for b in images]


def _x(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)


# ----- tritonclient -----------------------------------------------------------------------------
def test_tritonclient_server_and_model_calls(triton: Any, reference: Predictor) -> None:
    version = reference.name
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "cvm-edge" and "binary_tensor_data" in meta["extensions"]
    for v in ("", version):  # unversioned and versioned routes answer the same
        assert triton.is_model_ready("cvm", model_version=v)
        model = triton.get_model_metadata("cvm", model_version=v)
        assert model["name"] == "cvm" and model["versions"] == [version]
        assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in model["inputs"]
    assert not triton.is_model_ready("cvm", model_version="v999999")
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("cvm", model_version="v999999")
    assert err.value.status() == "404" and "no version 'v999999'" in err.value.message()
    assert version in err.value.message()


def test_tritonclient_fp32_binary_in_and_out(triton: Any, reference: Predictor) -> None:
    x = _x()
    expected = reference.run(x)
    inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True: the default
    # no outputs named: tritonclient asks for every output as binary (binary_data_output)
    result = triton.infer("cvm", [inp], request_id="r-1")
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == reference.name
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in response["outputs"])
    np.testing.assert_allclose(result.as_numpy("logits"), expected.logits, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("embedding"), expected.embedding, atol=1e-4)
    labels = [reference.classes[i] for i in expected.logits.argmax(1)]
    assert [b.decode() for b in result.as_numpy("label")] == labels

    # binary in, one output binary and one JSON, on the versioned route
    outs = [tritonhttp.InferRequestedOutput("logits"), tritonhttp.InferRequestedOutput("label", binary_data=False)]
    result = triton.infer("cvm", [inp], outputs=outs, model_version=reference.name)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "binary_data_size" in by_name["logits"]["parameters"] and by_name["label"]["data"] == labels
    np.testing.assert_allclose(result.as_numpy("logits"), expected.logits, atol=1e-4)

    # JSON in (binary_data=False), JSON out
    inp_json = tritonhttp.InferInput("input", list(x.shape), "FP32")
    inp_json.set_data_from_numpy(x, binary_data=False)
    result = triton.infer("cvm", [inp_json], outputs=[tritonhttp.InferRequestedOutput("logits", binary_data=False)])
    assert "data" in result.get_response()["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("logits"), expected.logits, atol=1e-4)


def test_tritonclient_bytes_images_binary(triton: Any, client: httpx.Client) -> None:
    images = _images()
    inp = tritonhttp.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))  # raw image bytes, length-prefixed
    outs = [tritonhttp.InferRequestedOutput("label"), tritonhttp.InferRequestedOutput("probabilities")]
    result = triton.infer("cvm", [inp], outputs=outs)
    assert [b.decode() for b in result.as_numpy("label")] == _labels(client, images)
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_tritonclient_versioned_infer_and_unknown_version(triton: Any, reference: Predictor) -> None:
    x = _x(1)
    inp = tritonhttp.InferInput("input", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(x)
    result = triton.infer("cvm", [inp], model_version=reference.name)
    np.testing.assert_allclose(result.as_numpy("logits"), reference.run(x).logits, atol=1e-4)
    with pytest.raises(InferenceServerException) as err:
        triton.infer("cvm", [inp], model_version="3")
    assert err.value.status() == "404" and "no version '3'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("other", [inp])
    assert err.value.status() == "404" and "unknown model" in err.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(
    triton: Any, client: httpx.Client, reference: Predictor, algorithm: str
) -> None:
    x = _x()
    inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    # Accept-Encoding too: the server may answer uncompressed, and the client takes that
    result = triton.infer(
        "cvm", [inp], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
    )
    np.testing.assert_allclose(result.as_numpy("logits"), reference.run(x).logits, atol=1e-4)
    images = _images()
    img = tritonhttp.InferInput("image", [len(images)], "BYTES")
    img.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = triton.infer(
        "cvm",
        [img],
        outputs=[tritonhttp.InferRequestedOutput("label")],
        model_version=reference.name,
        request_compression_algorithm=algorithm,
    )
    assert [b.decode() for b in result.as_numpy("label")] == _labels(client, images)


def test_tritonclient_error_is_the_servers_message(triton: Any) -> None:
    inp = tritonhttp.InferInput("input", [1, 3, 8, 8], "FP32")  # the model takes 32 px
    inp.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException) as err:
        triton.infer("cvm", [inp])
    assert err.value.status() == "400" and "input tensor must have shape [B, 3, 32, 32]" in err.value.message()


def test_tritonclient_asyncio_client(server: Any, client: httpx.Client, reference: Predictor) -> None:
    """tritonclient.http.aio (aiohttp underneath): the same calls, binary and gzip."""
    import tritonclient.http.aio as aio

    images = _images()

    async def calls() -> tuple[Any, ...]:
        c = aio.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            meta = await c.get_model_metadata("cvm", model_version=reference.name)
            ready = await c.is_model_ready("cvm", model_version=reference.name)
            other = await c.is_model_ready("cvm", model_version="1")
            inp = aio.InferInput("image", [len(images)], "BYTES")
            inp.set_data_from_numpy(np.array(images, dtype=np.object_))
            result = await c.infer(
                "cvm",
                [inp],
                model_version=reference.name,
                outputs=[aio.InferRequestedOutput("label")],
                request_compression_algorithm="gzip",
            )
            return meta, ready, other, result
        finally:
            await c.close()

    meta, ready, other, result = asyncio.run(calls())
    assert meta["versions"] == [reference.name] and ready is True and other is False
    assert [b.decode() for b in result.as_numpy("label")] == _labels(client, images)


def test_tritonclient_calls_of_extensions_not_served_get_json_404(triton: Any) -> None:
    """Triton-only extensions (model config, repository, statistics) are not advertised; they answer
    404 with the JSON error, which tritonclient raises as an exception with the status."""
    for call in (
        lambda: triton.get_model_config("cvm"),
        lambda: triton.get_model_repository_index(),
        lambda: triton.get_inference_statistics("cvm"),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404", err.value


# ----- KServe SDK -------------------------------------------------------------------------------
def _kserve_calls(url: str, x: np.ndarray, images: list[bytes]) -> dict[str, Any]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    async def calls() -> dict[str, Any]:
        got: dict[str, Any] = {}
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as c:
            got["live"] = await c.is_server_live(url)
            got["ready"] = await c.is_server_ready(url)
            got["model_ready"] = await c.is_model_ready(url, "cvm")
            got["other_ready"] = await c.is_model_ready(url, "other")
            fp32 = InferInput("input", list(x.shape), "FP32")
            fp32.set_data_from_numpy(x, binary_data=True)
            binary_out = {"binary_data_output": True}
            got["fp32_headers"] = {}
            request = InferRequest("cvm", [fp32], "k-1", parameters=binary_out)
            got["fp32"] = await c.infer(url, request, "cvm", response_headers=got["fp32_headers"])
            fp32_json = InferInput("input", list(x.shape), "FP32")
            fp32_json.set_data_from_numpy(x, binary_data=False)
            got["fp32_json"] = await c.infer(url, InferRequest("cvm", [fp32_json], "k-2"), "cvm")
            image = InferInput("image", [len(images)], "BYTES")
            image.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
            wanted = [
                RequestedOutput("label", {"binary_data": True}),
                RequestedOutput("logits", {"binary_data": False}),
            ]
            got["bytes_headers"] = {}
            request = InferRequest("cvm", [image], request_outputs=wanted)
            got["bytes"] = await c.infer(url, request, "cvm", response_headers=got["bytes_headers"])
            headers: dict[str, str] = {}
            got["dict"] = await c.infer(
                url,
                {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]},
                "cvm",
                response_headers=headers,
            )
            got["dict_headers"] = headers
            try:
                await c.infer(url, InferRequest("cvm", [fp32]), "other")
            except httpx.HTTPStatusError as exc:
                got["error"] = exc
        return got

    return asyncio.run(calls())


def test_kserve_rest_client(server: Any, client: httpx.Client, reference: Predictor) -> None:
    x, images = _x(), _images()
    expected = reference.run(x)
    got = _kserve_calls(server.url, x, images)
    assert got["live"] is True and got["ready"] is True
    assert got["model_ready"] is True and got["other_ready"] is False
    fp32 = got["fp32"]
    assert fp32.id == "k-1" and fp32.model_name == "cvm"
    outs = {o.name: o for o in fp32.outputs}
    # binary outputs: the SDK parsed the bytes after the announced JSON header
    assert got["fp32_headers"]["content-type"] == "application/octet-stream" and HEADER.lower() in got["fp32_headers"]
    np.testing.assert_allclose(outs["logits"].as_numpy(), expected.logits, atol=1e-4)
    np.testing.assert_allclose(outs["embedding"].as_numpy(), expected.embedding, atol=1e-4)
    json_outs = {o.name: o for o in got["fp32_json"].outputs}
    assert not json_outs["logits"].parameters  # no binary data asked for: plain JSON
    np.testing.assert_allclose(json_outs["logits"].as_numpy(), expected.logits, atol=1e-4)
    by_name = {o.name: o for o in got["bytes"].outputs}
    assert HEADER.lower() in got["bytes_headers"]  # the label came back as binary BYTES
    assert list(by_name["label"].as_numpy()) == _labels(client, images)  # the SDK decodes them to str
    assert by_name["logits"].as_numpy().shape == (3, 2)
    assert got["dict"].outputs[0].shape == [2, 2] and HEADER.lower() not in got["dict_headers"]
    assert got["error"].response.status_code == 404 and "unknown model" in str(got["error"])


# ----- hostile wire formats, by hand ------------------------------------------------------------
def _binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def _fp32_header(size: int, shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": shape or [1, 3, 32, 32], "datatype": "FP32"}
    return {"inputs": [{**tensor, "parameters": {"binary_data_size": size}, **extra}]}


def _bytes_header(size: int, shape: list[int]) -> dict[str, Any]:
    return {
        "inputs": [{"name": "image", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": size}}]
    }


def _element(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def _hostile_cases() -> list[tuple[str, bytes, dict[str, str], int, str]]:
    """(name, body, headers, expected status, a phrase of the error)."""
    x = np.zeros((1, 3, 32, 32), np.float32).tobytes()
    png = generated_images()["rgb.png"][0]
    good, good_headers = _binary_body(_fp32_header(len(x)), x)
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = []

    def add(name: str, body_headers: tuple[bytes, dict[str, str]], status: int, phrase: str) -> None:
        cases.append((name, body_headers[0], body_headers[1], status, phrase))

    add("header length not a number", (good, {**good_headers, HEADER: "12a"}), 400, HEADER)
    add("header length zero", (good, {**good_headers, HEADER: "0"}), 400, HEADER)
    add("header length negative", (good, {**good_headers, HEADER: "-5"}), 400, HEADER)
    add("header length in other digits", (good, {**good_headers, HEADER: b"\xb2"}), 400, HEADER)  # type: ignore[dict-item]
    add("header length of 5,000 digits", (good, {**good_headers, HEADER: "1" * 5000}), 400, HEADER)
    no_header = {k: v for k, v in good_headers.items() if k != HEADER}
    add("binary data without the header", (good, no_header), 400, "must be JSON")
    add("binary_data_size without binary data", (json.dumps(_fp32_header(len(x))).encode(), {}), 400, "past the end")
    add("header length past the body", (good, {**good_headers, HEADER: str(len(good) + 1)}), 400, HEADER)
    add("header length cuts the JSON", (good, {**good_headers, HEADER: "10"}), 400, "must be JSON")
    add("binary runs past the end", _binary_body(_fp32_header(len(x) + 4), x), 400, "past the end")
    add("bytes after the last input", _binary_body(_fp32_header(len(x)), x, b"\0" * 8), 400, "accounts for")
    add("binary but no binary input", _binary_body({"inputs": []}, b"\0" * 8), 400, "accounts for")
    add("FP32 size not the shape's", _binary_body(_fp32_header(len(x) - 4), x[:-4]), 400, "needs 12288")
    add("FP32 size not a multiple of 4", _binary_body(_fp32_header(6, [1]), b"\0" * 6), 400, "needs 4")
    add("FP32 huge shape", _binary_body(_fp32_header(len(x), [2**40, 2**40, 3]), x), 400, "needs")
    add("size negative", _binary_body(_fp32_header(-1), x), 400, "non-negative")
    add("size a string", _binary_body(_fp32_header("12288"), x), 400, "non-negative")  # type: ignore[arg-type]
    add("data and binary both", _binary_body(_fp32_header(len(x), data=[0.0]), x), 400, "both")
    add("shape not a list", _binary_body(_fp32_header(len(x), "1,3"), x), 400, "shape")  # type: ignore[arg-type]
    int8 = {"inputs": [{"name": "input", "shape": [4], "datatype": "INT8", "parameters": {"binary_data_size": 4}}]}
    add("INT8 binary", _binary_body(int8, b"\1\2\3\4"), 400, "FP32 and BYTES")
    add(
        "BYTES length past the end",
        _binary_body(_bytes_header(8, [1]), struct.pack("<I", 999), b"abcd"),
        400,
        "declares 999",
    )
    add("BYTES cut inside a length", _binary_body(_bytes_header(2, [1]), b"\1\0"), 400, "inside the length")
    add(
        "BYTES more elements than the shape",
        _binary_body(_bytes_header(2 * len(_element(png)), [1]), _element(png) * 2),
        400,
        "more than the 1",
    )
    add(
        "BYTES fewer elements than the shape",
        _binary_body(_bytes_header(len(_element(png)), [2]), _element(png)),
        400,
        "element 1",
    )
    add(
        "BYTES shape over the batch limit",
        _binary_body(_bytes_header(4 * 65, [65]), b"\0" * 4 * 65),
        400,
        "more than 64",
    )
    two = _element(b"plain") + _element(png)
    add("BYTES element not an image", _binary_body(_bytes_header(len(two), [2]), two), 415, "element 0")
    flags = {
        "inputs": _fp32_header(len(x))["inputs"],
        "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}],
    }
    add("binary_data not a boolean", _binary_body(flags, x), 400, "true or false")
    flags = {**_fp32_header(len(x)), "parameters": {"binary_data_output": "yes"}}
    add("binary_data_output not a boolean", _binary_body(flags, x), 400, "true or false")
    classify = {
        "inputs": _fp32_header(len(x))["inputs"],
        "outputs": [{"name": "label", "parameters": {"classification": 2}}],
    }
    add("classification extension", _binary_body(classify, x), 400, "classification")

    huge = np.full((1, 3, 32, 32), 3.0e38, np.float32)  # finite, but the logits overflow to NaN/inf
    add("outputs JSON cannot carry", _binary_body(_fp32_header(huge.nbytes), huge.tobytes()), 422, "")
    bomb = gzip.compress(b"\0" * (11 << 20))  # 11 MiB of zeros in about 11 kB
    add("gzip bomb over the limit", (bomb, {"Content-Encoding": "gzip"}), 413, "decompresses to more than")
    deflate_bomb = zlib.compress(b"{" * (11 << 20))
    add("deflate bomb over the limit", (deflate_bomb, {"Content-Encoding": "deflate"}), 413, "decompresses")
    add("gzip that is not gzip", (b"{not gzip}", {"Content-Encoding": "gzip"}), 400, "not valid gzip")
    add("truncated gzip", (gzip.compress(good)[:-20], {**good_headers, "Content-Encoding": "gzip"}), 400, "complete")
    add(
        "gzip with trailing garbage",
        (gzip.compress(good) + b"xx", {**good_headers, "Content-Encoding": "gzip"}),
        400,
        "complete",
    )
    add("brotli", (good, {**good_headers, "Content-Encoding": "br"}), 415, "Content-Encoding")
    add("two encodings", (good, {**good_headers, "Content-Encoding": "gzip, deflate"}), 415, "Content-Encoding")
    return cases


def test_malformed_binary_and_compressed_bodies_get_json_errors(client: httpx.Client, server: Any) -> None:
    cases = _hostile_cases()
    for name, body, headers, status, phrase in cases:
        r = client.post(V2, content=body, headers=headers)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", name
        error = r.json()
        assert set(error) == {"error"} and phrase in error["error"], (name, error)
        assert client.get("/v2/health/live").status_code == 200, name
    x = np.zeros((1, 3, 32, 32), np.float32).tobytes()
    body, headers = _binary_body(_fp32_header(len(x)), x)
    ok = client.post(V2, content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"  # no binary output asked for
    assert "Traceback" not in server.log()


def test_binary_response_layout(client: httpx.Client, reference: Predictor) -> None:
    """The bytes on the wire, checked without any client: JSON header of the announced length, then
    each binary output's bytes in output order (FP32 little-endian, BYTES length-prefixed UTF-8)."""
    x = _x()
    body, headers = _binary_body(
        {
            **_fp32_header(x.nbytes, list(x.shape)),
            "outputs": [
                {"name": "label", "parameters": {"binary_data": True}},
                {"name": "probabilities"},
                {"name": "logits", "parameters": {"binary_data": True}},
            ],
        },
        x.tobytes(),
    )
    r = client.post("/v2/models/cvm/versions/" + reference.name + "/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HEADER])
    head = json.loads(r.content[:n])
    expected = reference.run(x)
    labels = [reference.classes[i] for i in expected.logits.argmax(1)]
    label, probs, logits = head["outputs"]
    wire_labels = b"".join(_element(s.encode()) for s in labels)
    assert label["parameters"] == {"binary_data_size": len(wire_labels)} and "data" not in label
    assert np.allclose(probs["data"], expected.probabilities.ravel(), atol=1e-5)  # not asked for as binary
    assert logits["parameters"] == {"binary_data_size": 16}
    assert r.content[n : n + len(wire_labels)] == wire_labels
    np.testing.assert_allclose(
        np.frombuffer(r.content[n + len(wire_labels) :], "<f4").reshape(2, 2), expected.logits, atol=1e-4
    )
    assert len(r.content) == n + len(wire_labels) + 16


def test_versioned_routes_by_hand(client: httpx.Client, reference: Predictor) -> None:
    base = f"/v2/models/cvm/versions/{reference.name}"
    assert client.get(base).json() == client.get("/v2/models/cvm").json()
    assert client.get(base + "/ready").json() == {"name": "cvm", "ready": True}
    for path in ("/v2/models/cvm/versions/1", "/v2/models/cvm/versions/1/ready", "/v2/models/other/versions/1"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"}, (path, r.text)
    r = client.post("/v2/models/cvm/versions/1/infer", json={"inputs": []})
    assert r.status_code == 404 and "no version '1'" in r.json()["error"]


# ----- /openapi.json ------------------------------------------------------------------------------
def test_openapi_documents_bodies_errors_and_statuses(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error"] and "HTTPValidationError" not in schemas
    paths = doc["paths"]
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        op = paths[path]["post"]
        assert set(op["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
        assert op["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/InferenceRequest"
        }
        assert {"400", "404", "413", "415", "422", "503"} <= set(op["responses"])
        assert op["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
        assert {p["name"] for p in op["parameters"]} >= {"name", HEADER, "Content-Encoding"}
        assert set(op["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert {p["name"] for p in paths["/v2/models/{name}/versions/{version}"]["get"]["parameters"]} == {
        "name",
        "version",
    }
    classify = paths["/v1/classify"]["post"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(classify["requestBody"]["content"])
    assert {"400", "413", "415", "422", "503"} <= set(classify["responses"])
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    served = client.get("/metrics").headers["content-type"]
    assert list(metrics) == [served] and served.startswith("text/plain")
    assert {"401", "404", "409"} <= set(paths["/v1/admin/reload"]["post"]["responses"])
    for ops in paths.values():  # every operation documents the error schema
        for op in ops.values():
            assert op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
            assert "422" not in op["responses"] or "Error" in json.dumps(op["responses"]["422"])
