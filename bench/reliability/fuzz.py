"""Seeded malformed payloads for every endpoint that takes input, and a runner that checks the
answers: never a 5xx, never a dropped connection or a dead server, every error a JSON
``{"error": "..."}``. The same seed gives the same payloads, byte for byte.

Families: truncated, bit-flipped, zero-length, text, huge-dimension headers, polyglots, wrong
content types, (nested) multipart, query strings, and v2 infer with wrong shapes, dtypes, lengths
and JSON structure.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
from PIL import Image

V2 = "/v2/models/cvm/infer"
CLASSIFY = "/v1/classify"


@dataclasses.dataclass(frozen=True)
class Payload:
    family: str
    name: str
    path: str
    body: bytes
    content_type: str | None


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def base_images(jpegs: Sequence[bytes]) -> dict[str, bytes]:
    """Valid images in every accepted format, made from real JPEGs."""
    img = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    return {
        "jpeg": jpegs[0],
        "png": _encode(img, "PNG"),
        "webp": _encode(img, "WEBP", quality=80),
        "bmp": _encode(img, "BMP"),
    }


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_headers() -> dict[str, bytes]:
    """Well-formed headers that claim enormous images (decompression bombs), with a little data."""
    out = {}
    for w, h in ((65535, 65535), (2**31 - 1, 1), (1, 2**31 - 1), (100_000, 100_000), (0, 0)):
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        idat = zlib.compress(b"\0" * 64)
        out[f"png {w}x{h}"] = (
            b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
        )
    for w, h in ((65500, 65500), (65535, 1), (0, 0)):
        sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
        out[f"jpeg {w}x{h}"] = (
            b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 32 + b"\xff\xd9"
        )
    for w, h in ((2**31 - 1, 2**31 - 1), (100_000, -100_000), (60_000, 60_000)):
        info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
        out[f"bmp {w}x{h}"] = b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    out["webp 16384x16384"] = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    out["gif 65535x65535"] = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;"
    return out


def polyglots(images: dict[str, bytes]) -> dict[str, bytes]:
    zip_tail = b"PK\x03\x04" + b"\x00" * 26 + b"PK\x05\x06" + b"\x00" * 18
    return {
        "jpeg+zip": images["jpeg"] + zip_tail,
        "png+html": images["png"] + b"<html><script>alert(1)</script></html>",
        "gif/js": b"GIF89a/*\x00\x00\x00\x00*/=alert(1);//" + b"\x00" * 32,
        "pdf+jpeg": b"%PDF-1.4\n" + images["jpeg"],
        "html+png": b"<!doctype html><img src=x>" + images["png"],
        "bm-magic garbage": b"BM" + bytes(range(256)) * 4,
        "riff-webp truncated": b"RIFF\xff\xff\xff\xffWEBPVP8 " + b"\x00" * 20,
        "jpeg soi only": b"\xff\xd8\xff",
        "png signature only": b"\x89PNG\r\n\x1a\n",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"/>',
        "zip": zip_tail,
        "elf": b"\x7fELF\x02\x01\x01" + b"\x00" * 57,
    }


def _texts(rng: random.Random) -> list[bytes]:
    return [
        b"hello",
        b"\x00" * 100,
        "ünïcödé ✓ 图像".encode(),
        b'{"image": "x"}',
        b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><x>&a;</x>",
        bytes(rng.randrange(32, 127) for _ in range(2000)),
        b"\r\n\r\n--boundary--\r\n",
        b"data:image/png;base64," + base64.b64encode(b"\x89PNG"),
    ]


def _multipart(parts: Sequence[tuple[bytes, bytes]], boundary: bytes = b"fuzzb") -> bytes:
    """Raw multipart: each part is (header block, body)."""
    out = b""
    for headers, body in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + body + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def _file_part(
    body: bytes, name: bytes = b"file", filename: bytes = b"a.jpg", ctype: bytes = b"image/jpeg"
) -> tuple[bytes, bytes]:
    return (
        b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\nContent-Type: ' + ctype,
        body,
    )


def multipart_cases(images: dict[str, bytes], rng: random.Random) -> dict[str, tuple[bytes, str]]:
    mp = "multipart/form-data; boundary=fuzzb"
    inner = _multipart([_file_part(images["jpeg"])], b"inner")
    return {
        "nested multipart in a file part": (
            _multipart([_file_part(inner, ctype=b"multipart/form-data; boundary=inner")]),
            mp,
        ),
        "nested multipart/mixed": (
            _multipart(
                [
                    (
                        b'Content-Disposition: form-data; name="file"; filename="x"\r\nContent-Type: multipart/mixed; boundary=inner',
                        inner,
                    )
                ]
            ),
            mp,
        ),
        "file part with truncated jpeg": (_multipart([_file_part(images["jpeg"][: len(images["jpeg"]) // 2])]), mp),
        "file part with text": (_multipart([_file_part(b"just text", ctype=b"text/plain")]), mp),
        "text field named file": (_multipart([(b'Content-Disposition: form-data; name="file"', b"not a file")]), mp),
        "part without disposition": (_multipart([(b"Content-Type: image/jpeg", images["jpeg"])]), mp),
        "part without name": (_multipart([(b'Content-Disposition: form-data; filename="a.jpg"', images["jpeg"])]), mp),
        "traversal filename": (_multipart([_file_part(images["jpeg"], filename=b"../../../../etc/passwd")]), mp),
        "absolute filename": (_multipart([_file_part(images["jpeg"], filename=b"/etc/shadow")]), mp),
        "NUL in filename": (_multipart([_file_part(images["jpeg"], filename=b"a\x00.jpg")]), mp),
        "very long filename": (_multipart([_file_part(images["jpeg"], filename=b"a" * 5000 + b".jpg")]), mp),
        "40 file parts": (_multipart([_file_part(images["png"])] * 40), mp),
        "one good one bad part": (_multipart([_file_part(images["png"]), _file_part(b"\x00" * 64)]), mp),
        "boundary mismatch": (_multipart([_file_part(images["jpeg"])], b"other"), mp),
        "no closing boundary": (_multipart([_file_part(images["jpeg"])])[:-12], mp),
        "missing boundary parameter": (_multipart([_file_part(images["jpeg"])]), "multipart/form-data"),
        "empty boundary": (_multipart([_file_part(images["jpeg"])]), "multipart/form-data; boundary="),
        "garbage part headers": (
            b"--fuzzb\r\n" + bytes(rng.randrange(256) for _ in range(300)) + b"\r\n--fuzzb--\r\n",
            mp,
        ),
        "LF only line ends": (_multipart([_file_part(images["jpeg"])]).replace(b"\r\n", b"\n"), mp),
        "empty multipart": (b"--fuzzb--\r\n", mp),
        "zero-length multipart": (b"", mp),
        "huge header line": (b"--fuzzb\r\nX-A: " + b"a" * 20000 + b"\r\n\r\nx\r\n--fuzzb--\r\n", mp),
        "multipart/mixed top level": (_multipart([_file_part(images["jpeg"])]), "multipart/mixed; boundary=fuzzb"),
    }


def _v2(shape: Any, datatype: Any, data: Any, **extra: Any) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}], **extra}
    ).encode()


def v2_cases(images: dict[str, bytes], size: int, rng: random.Random) -> dict[str, bytes]:
    n = 3 * size * size
    good = [0.0] * n
    b64 = base64.b64encode(images["jpeg"]).decode()
    cases: dict[str, bytes] = {
        "rank 0 shape": _v2([], "FP32", [1.0]),
        "rank 3 shape": _v2([3, size, size], "FP32", good),
        "rank 9 shape": _v2([1] * 9, "FP32", [1.0]),
        "negative dim": _v2([-1, 3, size, size], "FP32", good),
        "float dims": _v2([1.0, 3.0, float(size), float(size)], "FP32", good),
        "string dims": _v2(["1", "3", str(size), str(size)], "FP32", good),
        "bool dims": _v2([True, 3, size, size], "FP32", good),
        "null shape": _v2(None, "FP32", good),
        "shape as object": _v2({"a": 1}, "FP32", good),
        "overflowing shape product": _v2([2**32, 2**32, 1, 1], "FP32", []),
        "huge shape": _v2([10**30, 3, size, size], "FP32", [1.0]),
        "zero batch": _v2([0, 3, size, size], "FP32", []),
        "batch 65": _v2([65, 3, size, size], "FP32", [0.0] * (n * 65)),
        "wrong channels": _v2([1, 4, size, size], "FP32", [0.0] * (4 * size * size)),
        "NHWC order": _v2([1, size, size, 3], "FP32", good),
        "data too short": _v2([1, 3, size, size], "FP32", good[:-1]),
        "data too long": _v2([1, 3, size, size], "FP32", [*good, 0.0]),
        "data empty": _v2([1, 3, size, size], "FP32", []),
        "data ragged": _v2([2, 2], "FP32", [[1.0, 2.0], [3.0]]),
        "data strings": _v2([1, 3, size, size], "FP32", ["0"] * n),
        "data bools": _v2([1, 3, size, size], "FP32", [False] * n),
        "data nulls": _v2([1, 3, size, size], "FP32", [None] * n),
        "data objects": _v2([1], "FP32", [{"a": 1}]),
        "data not a list": _v2([1], "FP32", "AAAA"),
        "data huge ints": _v2([1], "FP32", [10**400]),
        "data beyond float32": _v2([1, 3, size, size], "FP32", [1e39] * n),
        "NaN literal": _v2([1, 3, size, size], "FP32", good).replace(b"0.0]", b"NaN]"),
        "Infinity literal": _v2([1, 3, size, size], "FP32", good).replace(b"0.0]", b"-Infinity]"),
        "deeply nested data": b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":'
        + b"[" * 600
        + b"1"
        + b"]" * 600
        + b"}]}",
        "nesting past the parser": b"[" * 100_000 + b"]" * 100_000,
        "dtype INT8": _v2([1, 3, size, size], "INT8", [0] * n),
        "dtype FP16": _v2([1, 3, size, size], "FP16", good),
        "dtype FP64": _v2([1, 3, size, size], "FP64", good),
        "dtype BOOL": _v2([1], "BOOL", [True]),
        "dtype lower case": _v2([1, 3, size, size], "fp32", good),
        "dtype null": _v2([1], None, [1.0]),
        "dtype number": _v2([1], 32, [1.0]),
        "BYTES bad base64": _v2([1], "BYTES", ["***"]),
        "BYTES not an image": _v2([1], "BYTES", [base64.b64encode(b"plain text").decode()]),
        "BYTES truncated image": _v2([1], "BYTES", [base64.b64encode(images["jpeg"][:100]).decode()]),
        "BYTES number element": _v2([1], "BYTES", [123]),
        "BYTES shape mismatch": _v2([2], "BYTES", [b64]),
        "BYTES shape [1, 2]": _v2([1, 2], "BYTES", [b64, b64]),
        "BYTES 65 images": _v2([65], "BYTES", [b64] * 65),
        "BYTES empty": _v2([0], "BYTES", []),
        "BYTES huge header image": _v2([1], "BYTES", [base64.b64encode(huge_headers()["png 65535x65535"]).decode()]),
        "two inputs": json.dumps({"inputs": [{"name": "a"}, {"name": "b"}]}).encode(),
        "inputs empty": json.dumps({"inputs": []}).encode(),
        "inputs not a list": json.dumps({"inputs": {"name": "input"}}).encode(),
        "input not an object": json.dumps({"inputs": [5]}).encode(),
        "outputs a string": _v2([1, 3, size, size], "FP32", good, outputs="logits"),
        "outputs unknown": _v2([1, 3, size, size], "FP32", good, outputs=[{"name": "secret"}]),
        "outputs name object": _v2([1, 3, size, size], "FP32", good, outputs=[{"name": {"x": 1}}]),
        "outputs without name": _v2([1, 3, size, size], "FP32", good, outputs=[{}]),
        "top-level array": b"[1, 2, 3]",
        "top-level string": b'"inputs"',
        "top-level number": b"1e400",
        "top-level null": b"null",
        "not JSON": b"{inputs: [}",
        "truncated JSON": _v2([1, 3, size, size], "FP32", good)[:500],
        "latin-1 bytes": b"\xff\xfe\xfd{",
        "UTF-16 JSON": json.dumps({"inputs": []}).encode("utf-16"),
        "zero-length": b"",
        "BOM JSON": b"\xef\xbb\xbf" + _v2([1], "FP32", [1.0]),
        "duplicate keys": b'{"inputs": [], "inputs": 5}',
    }
    base = _v2([1, 3, size, size], "FP32", good)
    for i in range(30):  # random corruption of a valid request
        data = bytearray(base[:4000])
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases[f"bit-flipped request {i}"] = bytes(data)
    return cases


def _flip(data: bytes, rng: random.Random, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def payloads(jpegs: Sequence[bytes], image_size: int, seed: int = 0) -> list[Payload]:
    """The whole seeded corpus (over 300 payloads)."""
    rng = random.Random(seed)
    images = base_images(jpegs)
    out: list[Payload] = []

    def add(family: str, name: str, body: bytes, ctype: str | None, path: str = CLASSIFY) -> None:
        out.append(Payload(family, name, path, body, ctype))

    for fmt, data in images.items():
        image_type = f"image/{fmt}"
        for _ in range(12):
            cut = rng.randrange(1, len(data))
            add("truncated", f"{fmt} cut at {cut}", data[:cut], image_type)
        for i in range(20):
            add("bit-flipped", f"{fmt} {i}", _flip(data, rng, rng.choice((1, 4, 32, 256))), image_type)
    empty_type: str | None
    for empty_type in (
        "image/jpeg",
        "image/png",
        "application/octet-stream",
        None,
        "text/plain",
        "multipart/form-data; boundary=x",
    ):
        add("zero-length", f"empty as {empty_type}", b"", empty_type)
    for text in _texts(rng):
        for ctype in ("image/jpeg", "text/plain", "application/json"):
            add("text", f"{text[:12]!r} as {ctype}", text, ctype)
    for name, data in huge_headers().items():
        add("huge-dimension header", name, data, "application/octet-stream")
        add(
            "huge-dimension header",
            f"{name} as multipart",
            _multipart([_file_part(data)]),
            "multipart/form-data; boundary=fuzzb",
        )
    for name, data in polyglots(images).items():
        add("polyglot", name, data, "image/jpeg")
    for ctype in (
        "text/html",
        "application/json",
        "image/gif",
        "image/svg+xml",
        "image/tiff",
        "video/mp4",
        "application/x-www-form-urlencoded",
        "image/jpeg; charset=utf-8",
        "IMAGE/JPEG",
        "image/",
        ";;;",
        "image/jpeg, text/html",
        "a" * 3000,
    ):
        add("wrong content type", f"jpeg as {ctype[:40]}", images["jpeg"], ctype)
    for name, (body, ctype) in multipart_cases(images, rng).items():
        add("multipart", name, body, ctype)
    for query in (
        "top_k=0",
        "top_k=-1",
        "top_k=1001",
        "top_k=abc",
        "top_k=1e3",
        "top_k=",
        "top_k=99999999999999999999",
        "top_k=%00",
        "top_k=1&top_k=2",
        "top_k=" + "9" * 5000,
    ):
        add("query string", query[:40], images["jpeg"], "image/jpeg", f"{CLASSIFY}?{query}")
    for name, body in v2_cases(images, image_size, rng).items():
        add("v2 infer", name, body, "application/json", V2)
    for name in ("..%2F..%2Fetc%2Fpasswd", "%00", "a" * 3000, "cvm%2F..", "CVM", "cvm%20"):
        add("v2 model name", name[:40], _v2([1], "FP32", [1.0]), "application/json", f"/v2/models/{name}/infer")
    return out


@dataclasses.dataclass
class FuzzReport:
    sent: int = 0
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    by_family: dict[str, collections.Counter[int]] = dataclasses.field(default_factory=dict)
    violations: list[str] = dataclasses.field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "payloads": self.sent,
            "families": len(self.by_family),
            "status_counts": {str(k): v for k, v in sorted(self.statuses.items())},
            "by_family": {f: {str(k): v for k, v in sorted(c.items())} for f, c in self.by_family.items()},
            "violations": self.violations[:20],
            "n_violations": len(self.violations),
        }


def check_answer(p: Payload, r: httpx.Response) -> str | None:
    """What is wrong with an answer to a malformed payload (None: nothing)."""
    if r.status_code >= 500:
        return f"{p.family}/{p.name}: {r.status_code} {r.text[:200]}"
    try:
        body = r.json()
    except ValueError:
        return f"{p.family}/{p.name}: {r.status_code} answer is not JSON: {r.text[:100]!r}"
    if r.status_code >= 400 and not (
        isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    ):
        return f"{p.family}/{p.name}: {r.status_code} error is not {{'error': ...}}: {str(body)[:100]}"
    if r.status_code < 400 and not (isinstance(body, dict) and "model_version" in body):
        return f"{p.family}/{p.name}: {r.status_code} success without a model_version"
    return None


def run_fuzz(url: str, corpus: Sequence[Payload], alive: Callable[[], bool], every: int = 25) -> FuzzReport:
    report = FuzzReport()
    with httpx.Client(base_url=url, timeout=60) as c:
        for i, p in enumerate(corpus):
            headers = {} if p.content_type is None else {"Content-Type": p.content_type}
            try:
                r = c.post(p.path, content=p.body, headers=headers)
            except httpx.HTTPError as exc:
                report.violations.append(f"{p.family}/{p.name}: no answer ({exc!r})")
                if not alive():
                    report.violations.append("the server died")
                    return report
                continue
            report.sent += 1
            report.statuses[r.status_code] += 1
            report.by_family.setdefault(p.family, collections.Counter())[r.status_code] += 1
            problem = check_answer(p, r)
            if problem:
                report.violations.append(problem)
            if i % every == 0 and (not alive() or c.get("/v2/health/ready").status_code != 200):
                report.violations.append(f"server not ready after {p.family}/{p.name}")
                return report
    return report


def iter_families(corpus: Sequence[Payload]) -> Iterator[tuple[str, int]]:
    yield from collections.Counter(p.family for p in corpus).items()
