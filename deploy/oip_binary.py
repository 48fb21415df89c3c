"""The wire format of Open Inference Protocol v2 requests and responses beyond plain JSON: request
bodies compressed with ``Content-Encoding`` (gzip, deflate), and the binary tensor data extension
of KServe and Triton (``Inference-Header-Content-Length``), which tritonclient and the KServe SDK
use by default.

A binary request is a JSON header followed by the raw bytes of the inputs that declare
``parameters.binary_data_size``, in input order. FP32 bytes are little-endian float32 in row-major
order; a BYTES tensor is its elements one after another, each a 4-byte little-endian length and
then that many bytes (here: one encoded image per element). :func:`parse_request` turns such a
body into the JSON request the server reads, with each binary input's ``data`` replaced by a
float32 array (FP32) or a list of ``bytes`` (BYTES); every size is checked against the body and
the declared shape first, so a malformed request is a 400 and never a large allocation.

A response carries an output as binary when the request asks for it: the output's own
``parameters.binary_data``, else the request's ``parameters.binary_data_output``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from cvm_edge.errors import CvmError

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSION = "binary_tensor_data"
# zlib window bits per Content-Encoding: "deflate" is the zlib format (RFC 9110), as tritonclient sends it
ENCODINGS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_LENGTH = struct.Struct("<I")
_STEP = 1 << 20  # decompression output per step


class ProtocolError(CvmError):
    """A request the v2 wire format refuses, answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


def decode_content(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """``raw`` decompressed as its ``Content-Encoding`` says. The limit holds for the decompressed
    bytes too: decompression stops as soon as the output passes it, so a decompression bomb costs
    no more memory than a body at the limit (413). An unknown encoding is a 415; corrupt data, a
    truncated stream or bytes after its end (concatenated gzip members too) a 400."""
    name = (encoding or "identity").strip().lower()
    if name not in ENCODINGS:
        raise ProtocolError(415, f"unsupported Content-Encoding {encoding!r}: send identity, gzip or deflate")
    wbits = ENCODINGS[name]
    if wbits is None:
        return raw
    inflater = zlib.decompressobj(wbits)
    # In 1 MiB steps: a bomb is stopped as soon as it passes the limit and never reaches the final
    # join (one decompress call to the limit builds the output twice over, twice the memory)
    chunks: list[bytes] = []
    total, data = 0, raw
    try:
        while True:
            piece = inflater.decompress(data, _STEP)
            total += len(piece)
            if total > limit:
                raise ProtocolError(413, f"the {name} body decompresses to more than the limit of {limit} bytes")
            chunks.append(piece)
            data = inflater.unconsumed_tail
            if inflater.eof or (not data and len(piece) < _STEP):
                break
    except zlib.error as exc:
        raise ProtocolError(400, f"the body is not valid {name} data: {exc}") from None
    if not inflater.eof or inflater.unused_data:
        raise ProtocolError(400, f"the body is not one complete {name} stream")
    return b"".join(chunks)


def parse_request(raw: bytes, headers: Mapping[str, str], limit: int, max_bytes_elements: int) -> Any:
    """The JSON request of a v2 infer body (decompressed, binary inputs attached). ``limit``
    bounds the decompressed body; ``max_bytes_elements`` the elements of a binary BYTES input."""
    body = decode_content(raw, headers.get("content-encoding"), limit)
    declared = headers.get(HEADER_LENGTH.lower())
    if declared is None:
        request = _json(body)
        _attach_binary(request, memoryview(b""), max_bytes_elements)  # binary_data_size without binary data: 400
        return request
    # ASCII digits only, and few of them: int() takes other Unicode digits and refuses 4,300 or more
    if not re.fullmatch(r"[0-9]{1,12}", declared.strip()) or not 0 < int(declared) <= len(body):
        raise ProtocolError(
            400,
            f"{HEADER_LENGTH} must be a whole number of bytes from 1 to the body size ({len(body)}), not {declared!r}",
        )
    split = int(declared)
    request = _json(memoryview(body)[:split])
    _attach_binary(request, memoryview(body)[split:], max_bytes_elements)
    return request


def _json(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise ProtocolError(400, "the body must be JSON (Open Inference Protocol v2 request)") from None


def _attach_binary(request: Any, tail: memoryview, max_bytes_elements: int) -> None:
    """Replace each binary input's ``data`` by its slice of ``tail``; the slices must cover ``tail``."""
    inputs = request.get("inputs") if isinstance(request, dict) else None
    offset = 0
    for tensor in inputs if isinstance(inputs, list) else []:
        if not isinstance(tensor, dict):
            continue  # the server's input checks name this
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(400, "input 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is None:
            continue
        name = tensor.get("name")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(400, f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise ProtocolError(400, f"input {name!r} has both JSON 'data' and binary_data_size")
        if offset + size > len(tail):
            raise ProtocolError(
                400,
                f"input {name!r}: binary data runs past the end of the body ({len(tail) - offset} bytes left, {size} declared)",
            )
        tensor["data"] = _tensor(tensor, tail[offset : offset + size], max_bytes_elements)
        offset += size
    if offset != len(tail):
        raise ProtocolError(
            400,
            f"the body has {len(tail) - offset} bytes after the JSON header that no input's binary_data_size accounts for",
        )


def _tensor(tensor: dict[str, Any], chunk: memoryview, max_bytes_elements: int) -> Any:
    name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    count = math.prod(shape)  # exact integer: a huge shape cannot wrap around
    if dtype == "FP32":
        if len(chunk) != 4 * count:
            raise ProtocolError(
                400, f"input {name!r}: {len(chunk)} bytes of binary data, but FP32 shape {shape} needs {4 * count}"
            )
        return np.frombuffer(chunk, dtype="<f4").astype(np.float32)  # a writable, native-order copy
    if dtype == "BYTES":
        if count > max_bytes_elements:
            raise ProtocolError(400, f"input {name!r}: BYTES shape {shape} has more than {max_bytes_elements} elements")
        return _bytes_elements(name, chunk, count)
    raise ProtocolError(400, f"input {name!r}: binary data is supported for FP32 and BYTES inputs, not {dtype!r}")


def _bytes_elements(name: Any, chunk: memoryview, count: int) -> list[bytes]:
    """The elements of a binary BYTES tensor: ``count`` length-prefixed strings filling ``chunk``."""
    items, at = [], 0
    for i in range(count):
        if at + _LENGTH.size > len(chunk):
            raise ProtocolError(400, f"input {name!r}: BYTES data ends inside the length of element {i}")
        (n,) = _LENGTH.unpack_from(chunk, at)
        at += _LENGTH.size
        if at + n > len(chunk):
            raise ProtocolError(400, f"input {name!r}: BYTES element {i} declares {n} bytes, {len(chunk) - at} remain")
        items.append(bytes(chunk[at : at + n]))
        at += n
    if at != len(chunk):
        raise ProtocolError(400, f"input {name!r}: BYTES data holds more than the {count} elements its shape declares")
    return items


@dataclasses.dataclass(frozen=True)
class BinaryChoice:
    """Which outputs go back as binary data: each listed output's own ``binary_data``, else the
    request's ``binary_data_output`` (which also covers every output when none are listed)."""

    default: bool = False
    listed: tuple[tuple[str, bool], ...] = ()

    def wants(self, name: str) -> bool:
        return dict(self.listed).get(name, self.default)


def binary_choice(request: Any) -> BinaryChoice:
    """The :class:`BinaryChoice` of a v2 request; a malformed flag is a 400 before any inference."""
    if not isinstance(request, dict):
        return BinaryChoice()
    default = _flag(request.get("parameters"), "binary_data_output", "request") or False
    listed: list[tuple[str, bool]] = []
    outputs = request.get("outputs")
    for out in outputs if isinstance(outputs, list) else []:
        if not isinstance(out, dict):
            continue  # the server's output checks name this
        params = out.get("parameters")
        if isinstance(params, dict) and params.get("classification"):
            raise ProtocolError(400, "the classification extension is not supported: ask for 'probabilities'")
        own = _flag(params, "binary_data", f"output {out.get('name')!r}")
        listed.append((str(out.get("name")), default if own is None else own))
    return BinaryChoice(default, tuple(listed))


def _flag(params: Any, key: str, where: str) -> bool | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ProtocolError(400, f"{where} 'parameters' must be an object")
    if key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{where} parameter {key!r} must be true or false")
    return value


def respond(answer: dict[str, Any], choice: BinaryChoice) -> Response:
    """The infer response: plain JSON, or, when some output is wanted binary, the JSON header
    followed by those outputs' bytes (in output order) with ``Inference-Header-Content-Length``."""
    chunks: list[bytes] = []
    for out in answer["outputs"]:
        if not choice.wants(out["name"]):
            if out["datatype"] == "FP32" and not np.isfinite(np.asarray(out["data"], dtype=np.float32)).all():
                # JSON has no NaN or infinity: refuse rather than send null or fail with a 500
                raise ProtocolError(422, f"output {out['name']!r} holds NaN or infinite values")
            continue
        data = out.pop("data")
        if out["datatype"] == "BYTES":
            raw = b"".join(_LENGTH.pack(len(b)) + b for b in (str(s).encode("utf-8") for s in data))
        else:  # FP32: the JSON values are float32 already, so this round trip is exact
            raw = np.asarray(data, dtype="<f4").tobytes()
        out["parameters"] = {**out.get("parameters", {}), "binary_data_size": len(raw)}
        chunks.append(raw)
    if not chunks:
        return JSONResponse(answer)
    header = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
