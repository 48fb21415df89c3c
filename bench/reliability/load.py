"""Load during hot reload: N concurrent clients on loopback post real JPEGs to /v1/classify for a
fixed time while bundles are published (fp16, int8, fp32 bundles exported before the run and
published again, through the product's publishing path, during it); the server's RSS is sampled
all along. Bounded in time and client count; loopback only."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.reliability.common import Server

PRECISIONS = ("fp16", "int8", "fp32", "fp16", "int8")


@dataclasses.dataclass
class Sample:
    at: float
    status: int
    latency_s: float
    version: str | None


async def _client(
    url: str, images: Sequence[bytes], offset: int, until: float, out: list[Sample], errors: list[str]
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        i = offset
        while time.monotonic() < until:
            body = images[i % len(images)]
            i += 1
            t0 = time.monotonic()
            try:
                r = await c.post("/v1/classify", content=body, headers={"Content-Type": "image/jpeg"})
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            version = r.json().get("model_version") if r.status_code == 200 else None
            out.append(Sample(t0, r.status_code, time.monotonic() - t0, version))
            if not 200 <= r.status_code < 300:
                errors.append(f"{r.status_code}: {r.text[:200]}")


def _sample_rss(server: Server, stop: threading.Event, out: list[tuple[float, int]], every_s: float) -> None:
    while not stop.wait(every_s):
        if server.alive():
            out.append((time.monotonic(), server.rss_bytes()))


def _publisher(
    publish: Callable[[str], str], times: Sequence[float], t0: float, done: list[tuple[float, str, str]]
) -> None:
    for at, precision in zip(times, PRECISIONS, strict=False):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        done.append((time.monotonic() - t0, precision, publish(precision)))


def run_load(
    server: Server,
    images: Sequence[bytes],
    publish: Callable[[str], str],
    duration_s: float = 60.0,
    clients: int = 16,
    publishes: int = 5,
    window_s: float = 10.0,
) -> dict[str, Any]:
    """``publish(precision)`` publishes one bundle and returns its name."""
    samples: list[Sample] = []
    errors: list[str] = []
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()
    sampler = threading.Thread(target=_sample_rss, args=(server, stop, rss, 0.5), daemon=True)
    sampler.start()
    # publishes spread over the middle of the run, so the first and last windows are steady state
    times = [window_s + (duration_s - 2 * window_s) * (i + 0.5) / publishes for i in range(publishes)]
    published: list[tuple[float, str, str]] = []
    pub = threading.Thread(target=_publisher, args=(publish, times[:publishes], t0, published), daemon=True)
    pub.start()

    async def main() -> None:
        until = t0 + duration_s
        await asyncio.gather(*(_client(server.url, images, k * 7, until, samples, errors) for k in range(clients)))

    asyncio.run(main())
    pub.join(timeout=300)
    stop.set()
    sampler.join(timeout=5)
    wall = time.monotonic() - t0
    lat = np.asarray([s.latency_s for s in samples]) * 1000
    first = [b for t, b in rss if t - t0 <= window_s]
    last = [b for t, b in rss if t - t0 >= wall - window_s]
    versions = [s.version for s in samples if s.version]
    names = [name for _, _, name in published]
    return {
        "duration_s": round(wall, 2),
        "clients": clients,
        "images": len(images),
        "requests": len(samples),
        "non_2xx": sum(1 for s in samples if not 200 <= s.status < 300),
        "transport_errors": len([e for e in errors if not e[:3].isdigit()]),
        "errors_sample": errors[:5],
        "throughput_rps": round(len(samples) / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p90": round(float(np.percentile(lat, 90)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "max": round(float(lat.max()), 2),
        },
        "bundles_published": [{"at_s": round(t, 2), "precision": p, "name": n} for t, p, n in published],
        "bundles_served": list(dict.fromkeys(versions)),
        "published_and_served": sum(1 for n in names if n in versions),
        "rss_mb": {
            "first_window_mean": round(statistics.mean(first) / 2**20, 1),
            "last_window_mean": round(statistics.mean(last) / 2**20, 1),
            "max": round(max(b for _, b in rss) / 2**20, 1),
            "samples": len(rss),
        },
        "rss_growth": round(statistics.mean(last) / statistics.mean(first) - 1, 4),
        "window_s": window_s,
    }


def republish(workdir: Path, source: str) -> str:
    """Publish a copy of the exported bundle ``source`` under its next revision name, through the
    product's own publishing path (temp dir, fsync, rename, CURRENT), under the store lock. What
    the server sees is exactly a `cvm export` finishing, without minutes of export CPU in the run."""
    from cvm_edge.fsutil import FileLock
    from deploy.bundle import CONCEPTS_FILE, MODEL_FILE, bundles_root, load_bundle, next_bundle_name, publish_bundle

    root = bundles_root(workdir)
    bundle = load_bundle(root / source)
    name = next_bundle_name(root, bundle.version, bundle.precision)
    files = {f: (root / source / f).read_bytes() for f in (MODEL_FILE, CONCEPTS_FILE)}
    with FileLock(workdir / ".lock", "reliability load publisher"):
        publish_bundle(root, name, files, {**bundle.manifest, "name": name})
    return name
