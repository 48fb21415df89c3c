"""Hostile inputs aimed at memory and CPU (issue 18), and the runs that measure what they cost the
server: peak RSS under concurrent decompression bombs, `/v2/health/live` latency while clients send
images that are slow to decode, and the status of every answer (never a 5xx).

The images are built here, byte for byte the same each run:

- :func:`webp_bomb`: a lossless WebP of one colour whose header is patched to any size. Its
  entropy-coded data has zero bits per pixel, so 38 bytes decode to 6300 x 6300 (640 MB on the way
  to RGB in Pillow 13);
- :func:`png_strip`: a 1 x N grey PNG (a strip: the extreme aspect ratio);
- :func:`bmp_rle`: an 8-bit RLE BMP in its worst case (runs of one pixel), which Pillow decodes in
  Python at about 0.5 us a pixel, holding the GIL.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
from PIL import Image

V2 = "/v2/models/cvm/infer"
CLASSIFY = "/v1/classify"


# ----- images ------------------------------------------------------------------------------------------
def webp_bomb(w: int, h: int) -> bytes:
    """A lossless WebP that declares ``w`` x ``h`` (at most 16384 each) in a few dozen bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(buf, "WEBP", lossless=True)
    data = buf.getvalue()
    i = data.index(b"VP8L") + 9  # chunk tag, chunk size, signature byte 0x2f: then 14 + 14 size bits
    bits = int.from_bytes(data[i : i + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)
    return data[:i] + bits.to_bytes(4, "little") + data[i + 4 :]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_strip(w: int, h: int) -> bytes:
    """A valid ``w`` x ``h`` 8-bit grey PNG of zeros (small: the rows compress to almost nothing)."""
    row = b"\x00" * (w + 1)  # filter byte + pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(h - done, 1 << 20)) for done in range(0, h, 1 << 20)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bmp_rle(w: int, h: int) -> bytes:
    """An 8-bit RLE BMP of ``w`` x ``h`` made of one-pixel runs (the slowest to decode per byte)."""
    row = bytes([1, 7, 1, 200]) * (w // 2) + (bytes([1, 7]) if w % 2 else b"") + b"\x00\x00"
    pixels = row * h + b"\x00\x01"
    palette = b"".join(bytes([i, 255 - i, i // 2, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _v2_bytes(images: Sequence[bytes], outputs: Sequence[str] | None = None) -> bytes:
    data = [base64.b64encode(b).decode() for b in images]
    req: dict[str, Any] = {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
    if outputs is not None:
        req["outputs"] = [{"name": n} for n in outputs]
    return json.dumps(req).encode()


def _multipart(images: Sequence[bytes]) -> tuple[bytes, str]:
    parts = b"".join(
        b'--hb\r\nContent-Disposition: form-data; name="file"; filename="%d.img"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" % i + img + b"\r\n"
        for i, img in enumerate(images)
    )
    return parts + b"--hb--\r\n", "multipart/form-data; boundary=hb"


Request = tuple[str, str, bytes, str]  # family, path, body, content type


def corpus(image_size: int = 32) -> list[Request]:
    """The hostile requests of the memory/CPU families, each family on every input path."""
    out: list[Request] = []

    def every_path(family: str, images: Sequence[bytes]) -> None:
        out.append((family, CLASSIFY, images[0], "application/octet-stream"))
        out.append((family, CLASSIFY, *_multipart(images)))
        out.append((family, V2, _v2_bytes(images), "application/json"))

    for side in (4600, 6300, 9000, 16384):
        every_path("bomb", [webp_bomb(side, side)] * 4)
    every_path("bomb", [webp_bomb(4000, 4000)] * 8)  # each fits, together over the request's pixels
    every_path("bomb", [png_strip(6000, 6000)])  # 36 MP of grey: under every limit, decoded
    for w, h in ((1, 200_000), (1, 39_999_999), (200_000, 1), (3, 5000), (16384, 2)):
        every_path("aspect", [png_strip(w, h)])
    for w, h in ((600, 600), (2000, 2000), (512, 512)):
        every_path("slow decode", [bmp_rle(w, h)])
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    fp32 = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    for outputs in (["embedding"] * 50, ["logits", "logits"], ["label", "nope"], ["embedding"] * 100_000):
        req = {"inputs": [fp32], "outputs": [{"name": n} for n in outputs]}
        out.append(("amplification", V2, json.dumps(req).encode(), "application/json"))
    for value in (3.0e38, -3.4e38, 1.0e38):
        big = {**fp32, "data": [value] * x.size}
        out.append(("non-finite", V2, json.dumps({"inputs": [big]}).encode(), "application/json"))
    return out


# ----- runs --------------------------------------------------------------------------------------------
class RssSampler:
    """The peak RSS of a process, sampled every ``interval`` s in a thread."""

    def __init__(self, rss: Callable[[], int], interval: float = 0.02) -> None:
        self.rss, self.interval = rss, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except (OSError, RuntimeError):
                return
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def _send_all(url: str, requests: Sequence[Request], concurrency: int) -> list[tuple[str, int | str]]:
    """Every request, ``concurrency`` at a time; (family, status or the transport error)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:

        async def one(req: Request) -> tuple[str, int | str]:
            family, path, body, ctype = req
            async with sem:
                try:
                    r = await c.post(path, content=body, headers={"Content-Type": ctype})
                except httpx.HTTPError as exc:
                    return family, type(exc).__name__
                if r.status_code >= 400 and r.headers.get("content-type") != "application/json":
                    return family, f"{r.status_code} not JSON"
                return family, r.status_code

        return list(await asyncio.gather(*(one(r) for r in requests)))


def run_corpus(url: str, rss: Callable[[], int], requests: Sequence[Request], concurrency: int = 8) -> dict[str, Any]:
    """The corpus, several at a time: statuses by family and the server's peak RSS."""
    with RssSampler(rss) as sampler:
        answers = asyncio.run(_send_all(url, requests, concurrency))
    by_family: dict[str, collections.Counter[str]] = {}
    for family, status in answers:
        by_family.setdefault(family, collections.Counter())[str(status)] += 1
    return {
        "requests": len(answers),
        "by_family": {f: dict(sorted(c.items())) for f, c in by_family.items()},
        "responses_5xx": sum(1 for _, s in answers if isinstance(s, int) and s >= 500),
        "no_answer_or_not_json": sum(1 for _, s in answers if not isinstance(s, int)),
        "peak_rss_mb": round(sampler.peak / 2**20, 1),
    }


def run_bombs(url: str, rss: Callable[[], int], concurrency: int = 64, near_budget: int = 8) -> dict[str, Any]:
    """``concurrency`` clients at once, each a v2 request of four 6300 x 6300 WebP bombs (the issue's
    attack), then as many raw bomb bodies, and ``near_budget`` bombs the server does decode; the
    server's baseline and peak RSS."""
    bomb = webp_bomb(6300, 6300)
    requests: list[Request] = [("bomb v2", V2, _v2_bytes([bomb] * 4), "application/json")] * concurrency
    requests += [("bomb raw", CLASSIFY, bomb, "image/webp")] * concurrency
    # just under the decode budget (18.5 MP, about 300 MB each): decoded, one at a time
    requests += [("near-budget bomb", CLASSIFY, webp_bomb(4300, 4300), "image/webp")] * near_budget
    baseline = rss()
    figures = run_corpus(url, rss, requests, concurrency)
    return {"concurrent_clients": concurrency, "baseline_rss_mb": round(baseline / 2**20, 1), **figures}


def run_health_under_decode(
    url: str, images: Sequence[bytes], clients: int = 40, duration_s: float = 10.0, probe_every_s: float = 0.05
) -> dict[str, Any]:
    """``clients`` clients post slow-to-decode ``images`` in a loop for ``duration_s``, while a probe
    in a thread of its own (so that the load's event loop does not delay it) asks
    ``/v2/health/live`` every ``probe_every_s``: its latency percentiles and any failure."""
    latencies: list[float] = []
    failures = 0
    stop = time.monotonic() + duration_s

    def probe() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    ok = c.get("/v2/health/live").status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                failures += not ok
                time.sleep(probe_every_s)

    async def load() -> collections.Counter[str]:
        statuses: collections.Counter[str] = collections.Counter()

        async def loader(c: httpx.AsyncClient, k: int) -> None:
            i = k
            while time.monotonic() < stop:
                try:
                    r = await c.post(CLASSIFY, content=images[i % len(images)])
                    statuses[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                i += 1

        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            await asyncio.gather(*(loader(c, k) for k in range(clients)))
        return statuses

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    statuses = asyncio.run(load())
    prober.join()
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "duration_s": duration_s,
        "image_requests": dict(sorted(statuses.items())),
        "health_probes": len(latencies),
        "health_failures": failures,
        "health_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "health_p99_ms": round(float(np.percentile(ms, 99)), 1),
        "health_max_ms": round(float(ms.max()), 1),
    }


def hard_images() -> list[bytes]:
    """Images that take the server long to decode yet are accepted: BMP RLE at the slow-decode bound,
    a 6000 x 6000 grey PNG, a 4000 x 4000 lossless WebP, a 60 x 5,000 strip."""
    return [bmp_rle(512, 512), png_strip(6000, 6000), webp_bomb(4000, 4000), png_strip(60, 5000)]


def run_reload_storm(
    url: str, rss: Callable[[], int], token: str, image: bytes, duration_s: float = 15.0, clients: int = 16
) -> dict[str, Any]:
    """``clients`` clients classify in a loop while forced admin reloads follow each other for
    ``duration_s``; then 3 s idle. RSS before, at its peak, and idle after (replaced models must be
    freed and their heap returned)."""
    stop = time.monotonic() + duration_s
    statuses: collections.Counter[str] = collections.Counter()
    reloads = 0

    def storm() -> None:
        nonlocal reloads
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                r = c.post("/v1/admin/reload", headers={"Authorization": f"Bearer {token}"})
                statuses[f"reload {r.status_code}"] += 1
                reloads += r.status_code == 200

    async def load() -> None:
        async def loader(c: httpx.AsyncClient) -> None:
            while time.monotonic() < stop:
                try:
                    statuses[str((await c.post(CLASSIFY, content=image)).status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            await asyncio.gather(*(loader(c) for _ in range(clients)))

    baseline = rss()
    with RssSampler(rss) as sampler:
        reloader = threading.Thread(target=storm, daemon=True)
        reloader.start()
        asyncio.run(load())
        reloader.join()
    time.sleep(3.0)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "forced_reloads": reloads,
        "statuses": dict(sorted(statuses.items())),
        "baseline_rss_mb": round(baseline / 2**20, 1),
        "peak_rss_mb": round(sampler.peak / 2**20, 1),
        "idle_rss_mb": round(rss() / 2**20, 1),
    }
