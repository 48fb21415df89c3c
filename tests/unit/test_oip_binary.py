"""deploy.oip_binary on its own: the decompression limit to the byte, header-length parsing, input
slicing, BYTES elements and which outputs go back binary. The clients and the server process are
in test_deploy_clients.py."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest

from deploy.oip_binary import HEADER_LENGTH, ProtocolError, binary_choice, decode_content, parse_request, respond


def _status(fn: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(ProtocolError) as err:
        fn(*args)
    return err.value.http_status, str(err.value)


@pytest.mark.parametrize("limit", [100_000, (3 << 20) + 5])  # one step, and several 1 MiB steps
@pytest.mark.parametrize(("name", "pack"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_decompressed_size_is_bounded_to_the_byte(name: str, pack: Any, limit: int) -> None:
    exact = bytes(range(256)) * (limit // 256) + b"x" * (limit % 256)
    assert len(exact) == limit
    assert decode_content(pack(exact), name, limit) == exact
    assert decode_content(pack(exact), name.upper(), limit) == exact
    assert _status(decode_content, pack(exact + b"y"), name, limit)[0] == 413
    assert _status(decode_content, pack(b"\0" * (50 * limit)), name, limit)[0] == 413


def test_encodings_identity_unknown_and_corrupt() -> None:
    assert decode_content(b"abc", None, 3) == b"abc"
    assert decode_content(b"abc", "identity", 3) == b"abc"
    for bad in ("br", "compress", "gzip, gzip", ""):
        if bad:
            assert _status(decode_content, b"abc", bad, 10)[0] == 415
    raw_deflate = zlib.compressobj(wbits=-15)
    data = raw_deflate.compress(b"{}") + raw_deflate.flush()
    assert _status(decode_content, data, "deflate", 10)[0] == 400  # deflate means the zlib format
    assert _status(decode_content, zlib.compress(b"{}")[:-3], "deflate", 10)[0] == 400
    assert _status(decode_content, zlib.compress(b"{}") + b"more", "deflate", 10)[0] == 400


def _body(header: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {HEADER_LENGTH.lower(): str(len(head))}


def test_header_length_must_be_a_small_ascii_number() -> None:
    body, headers = _body({"inputs": []}, b"")
    assert parse_request(body, headers, 1000, 4) == {"inputs": []}
    for value in ("\u00b2", "\u0661\u0662", "1" * 5000, "+5", "5.0", " ", f"{len(body) + 1}"):
        status, message = _status(parse_request, body, {HEADER_LENGTH.lower(): value}, 1000, 4)
        assert status == 400 and HEADER_LENGTH in message, value


def test_binary_inputs_are_sliced_in_order_and_must_fill_the_body() -> None:
    x = np.arange(6, dtype=np.float32)
    y = np.arange(4, dtype=np.float32) + 100
    elements = struct.pack("<I", 0) + struct.pack("<I", 3) + b"abc"
    header = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
            {"name": "j", "shape": [1], "datatype": "FP32", "data": [1.0]},  # JSON data among binary inputs
            {"name": "s", "shape": [2, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(elements)}},
            {"name": "b", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
        ]
    }
    body, headers = _body(header, x.tobytes() + elements + y.tobytes())
    request = parse_request(body, headers, 10_000, 4)
    a, j, s, b = request["inputs"]
    np.testing.assert_array_equal(a["data"], x)
    assert a["data"].flags.writeable and j["data"] == [1.0]
    assert s["data"] == [b"", b"abc"]
    np.testing.assert_array_equal(b["data"], y)
    # the same request gzipped
    assert parse_request(gzip.compress(body), {**headers, "content-encoding": "gzip"}, 10_000, 4)["inputs"][2] == s
    # binary_data_size with no binary part at all
    status, message = _status(parse_request, json.dumps(header).encode(), {}, 10_000, 4)
    assert status == 400 and "past the end" in message


def test_bytes_elements_are_bounded_by_the_shape_and_the_limit() -> None:
    one = struct.pack("<I", 1) + b"z"
    header = {"inputs": [{"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": 24}}]}
    body, headers = _body(header, one * 3 + b"\0" * 9)
    assert "more than the 3 elements" in _status(parse_request, body, headers, 1000, 8)[1]
    assert "more than 2 elements" in _status(parse_request, body, headers, 1000, 2)[1]
    header["inputs"][0]["parameters"]["binary_data_size"] = 6
    body, headers = _body(header, one * 3)
    assert "ends inside the length of element 1" in _status(parse_request, body, headers, 1000, 8)[1]


def test_binary_choice_and_response_layout() -> None:
    assert not binary_choice({}).wants("logits")
    everything = binary_choice({"parameters": {"binary_data_output": True}})
    assert everything.wants("logits") and everything.wants("label")
    mixed = binary_choice(
        {
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "logits"}],
        }
    )
    assert not mixed.wants("label") and mixed.wants("logits")
    own = binary_choice({"outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "logits"}]})
    assert own.wants("label") and not own.wants("logits")
    for bad in (
        {"parameters": []},
        {"parameters": {"binary_data_output": 1}},
        {"outputs": [{"name": "x", "parameters": 3}]},
    ):
        assert _status(binary_choice, bad)[0] == 400

    answer = {
        "model_name": "cvm",
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["猫", "T-shirt/top"]},
            {"name": "logits", "datatype": "FP32", "shape": [2, 1], "data": [0.5, -3.25]},
        ],
    }
    r = respond(json.loads(json.dumps(answer)), own)
    n = int(r.headers[HEADER_LENGTH])
    head = json.loads(r.body[:n])
    labels = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in ("猫", "T-shirt/top"))
    assert head["outputs"][0] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "parameters": {"binary_data_size": len(labels)},
    }
    assert head["outputs"][1]["data"] == [0.5, -3.25] and r.body[n:] == labels
    plain = respond(json.loads(json.dumps(answer)), binary_choice({}))
    assert HEADER_LENGTH.lower() not in plain.headers and json.loads(plain.body) == answer


def test_json_outputs_that_json_cannot_carry_are_a_422_not_a_500() -> None:
    """NaN and infinity have no JSON form: a JSON output holding them is refused; as binary data
    (little-endian float32) they travel as they are."""
    answer = {"outputs": [{"name": "logits", "datatype": "FP32", "shape": [2], "data": [float("nan"), 1.0]}]}
    status, message = _status(respond, json.loads(json.dumps(answer)), binary_choice({}))
    assert status == 422 and "'logits'" in message
    r = respond(json.loads(json.dumps(answer)), binary_choice({"parameters": {"binary_data_output": True}}))
    n = int(r.headers[HEADER_LENGTH])
    assert np.isnan(np.frombuffer(r.body[n:], "<f4")[0])
