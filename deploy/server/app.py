"""The HTTP server: FastAPI on uvicorn, built by :func:`create_app` from :class:`ServerSettings`.

Endpoints (every error is ``{"error": "..."}`` with its status):

- ``POST /v1/classify`` - one image as the raw body, or multipart ``file`` parts (several allowed)
- Open Inference Protocol v2 subset: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``
  (each also under ``/v2/models/{name}/versions/{version}``; binary tensor data and compressed
  bodies: :mod:`deploy.oip_binary`; ``/openapi.json``: :mod:`deploy.openapi_doc`)
- ``GET /v1/model``, ``GET /metrics`` (Prometheus), ``POST /v1/admin/reload`` (bearer token)

The :class:`ModelHolder` polls the bundle store's ``CURRENT`` pointer in a background thread,
loads and warms a new bundle off the request path and swaps one reference. Requests take that
reference once, so in-flight requests finish on the model they started with; a bundle that
fails to load is refused and the old one keeps serving. No torch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import ctypes
import ctypes.util
import dataclasses
import datetime as dt
import hmac
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from cvm_edge import __version__
from cvm_edge.errors import CvmError, DataError, ModelLoadError
from cvm_edge.fsutil import fault_point, read_pointer
from cvm_edge.preprocess import UnsupportedImageError, normalise
from deploy import oip_binary, openapi_doc
from deploy.batching import Batcher, BatchSettings
from deploy.bundle import checkpoint_dir_name, current_bundle_dir
from deploy.imagedecode import DecodeLimits, ImageDecoder
from deploy.predictor import Outputs, Predictor, PredictorOptions

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "CVM_ADMIN_TOKEN"
RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp", "application/octet-stream")
V2_OUTPUTS = ("logits", "probabilities", "embedding", "label")
MAX_POINTER_CHASES = 3
MAX_V2_DIMS = 8  # [B, 3, H, W] needs 4; anything far longer is garbage
CLIENT_GONE = 499  # nginx's status for "the client closed the connection"; never sent, only counted
T = TypeVar("T")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


# ----- settings and errors ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerSettings:
    workdir: Path | None = None  # serve <workdir>/bundles/CURRENT and follow it
    bundle: Path | None = None  # or one fixed bundle directory
    host: str = "127.0.0.1"
    port: int = 8080
    predictor: PredictorOptions = dataclasses.field(default_factory=PredictorOptions)
    poll_interval_s: float = 1.0  # 0 disables polling (reload through the admin endpoint only)
    max_body_bytes: int = 10 << 20
    max_files: int = 32
    default_top_k: int = 5
    model_name: str = "cvm"
    admin_token: str | None = None
    access_log: bool = True
    max_request_pixels: int = DecodeLimits.max_request_pixels
    max_aspect_ratio: float = DecodeLimits.max_aspect_ratio
    decode_memory_bytes: int = DecodeLimits.memory_bytes
    worker_threads: int = 0  # decode + inference threads; 0: min(8, 2 x CPUs)
    request_timeout_s: float = 30.0  # to receive a request's headers, and (separately) its body
    max_connections: int = 512  # open connections; more are closed at once (keep under LimitNOFILE)
    # Dynamic batching of /v1/classify (deploy/batching.py): how long a batch waits for requests
    # still being decoded (0: off), images per onnxruntime call, images admitted and unanswered
    # (more: 503), batches run at once (0: CPUs / intra-op threads, at most worker threads - 1).
    batch_window_ms: float = 0.0  # off: no throughput gain measured on a 2-core CPU (bench/server_latency.py)
    batch_max_images: int = 16
    batch_queue_images: int = 256
    batch_runners: int = 0
    http_parser: str = "auto"  # httptools (C) when installed, else h11; deploy/httpproto.py
    event_loop: str = "auto"  # uvloop when installed, else asyncio

    def __post_init__(self) -> None:
        if (self.workdir is None) == (self.bundle is None):
            raise ValueError("give exactly one of workdir and bundle")
        if self.poll_interval_s < 0 or self.max_body_bytes < 1 or self.max_files < 1:
            raise ValueError("poll interval, body limit and file limit must be positive")
        if self.worker_threads < 0 or not self.request_timeout_s > 0 or self.max_connections < 1:
            raise ValueError("worker threads must be >= 0; request timeout and connection limit positive")
        self.decode_limits()  # validates them
        if self.batching().max_queued_images < self.max_files:
            raise ValueError("the batch queue must hold the images of the largest request (max_files)")
        if self.batch_max_images > self.predictor.max_batch:
            raise ValueError("the dynamic batch cannot be larger than the model's max batch")
        if self.http_parser not in ("auto", "httptools", "h11") or self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError("http_parser is auto, httptools or h11; event_loop auto, uvloop or asyncio")

    @property
    def threads(self) -> int:
        return self.worker_threads or min(8, 2 * (os.cpu_count() or 1))

    def batching(self) -> BatchSettings:
        runners = self.batch_runners
        if runners == 0:
            intra = self.predictor.intra_op_threads
            runners = max(1, (os.cpu_count() or 1) // intra) if intra else 1
            runners = max(1, min(runners, self.threads - 1))  # leave a worker thread to decode
        return BatchSettings(
            window_ms=self.batch_window_ms,
            max_images=self.batch_max_images,
            max_queued_images=self.batch_queue_images,
            runners=runners,
        )

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_pixels=self.max_pixels,
            max_request_pixels=self.max_request_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            memory_bytes=self.decode_memory_bytes,
        )

    @property
    def max_pixels(self) -> int:
        return self.predictor.max_pixels


class HTTPError(CvmError):
    """An error answered with a given status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class ClientGone(CvmError):
    """The client closed the connection before its request body was complete."""

    http_status = CLIENT_GONE


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ----- metrics ---------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (one per app, never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cvm_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.errors = Counter("cvm_errors", "HTTP responses with status >= 400", ["status"], registry=r)
        self.latency = Histogram(
            "cvm_request_latency_seconds",
            "Request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.images = Counter("cvm_images_classified", "Images run through the model", registry=r)
        self.batch_images = Histogram(
            "cvm_batch_images",
            "Images per model run of the dynamic batcher (/v1/classify with batching on)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.model_version = Gauge("cvm_model_version", "Checkpoint version of the model being served", registry=r)
        self.model_info = Gauge("cvm_model_info", "The bundle being served", ["bundle", "precision"], registry=r)
        self.reloads = Counter("cvm_model_reloads", "Bundle loads after start-up", ["result"], registry=r)
        self.disconnects = Counter(
            "cvm_client_disconnects", "Requests whose client hung up before the body was complete", registry=r
        )
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # exported as 0 from the start

    def set_model(self, predictor: Predictor) -> None:
        self.model_version.set(predictor.bundle.version)
        self.model_info.clear()
        self.model_info.labels(bundle=predictor.name, precision=predictor.bundle.precision).set(1)


class MetricsMiddleware:
    """Counts every request by route template and status, and times it (pure ASGI, low overhead)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._cache: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            count, latency = self._children(scope.get("method", ""), route, status)
            count.inc()
            latency.observe(time.perf_counter() - t0)
            if status >= 400:
                self.metrics.errors.labels(status=str(status)).inc()

    def _children(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The labelled counter and histogram of one (method, route, status): looked up once, not
        per request (``labels()`` takes a lock and builds a key each time). Route is the template
        or "unmatched", so the cache is as small as the metric itself."""
        key = (method, route, status)
        found = self._cache.get(key)
        if found is None:
            m = self.metrics
            found = (m.requests.labels(method=method, route=route, status=str(status)), m.latency.labels(route=route))
            if len(self._cache) < 1024:  # methods are the client's: never an unbounded cache
                self._cache[key] = found
        return found


# ----- model holder ------------------------------------------------------------------------------
def release_free_memory() -> bool:
    """``malloc_trim(0)``: return free heap pages to the OS (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def use_mmap_for_large_buffers(threshold: int = 4 << 20, trim: int = 32 << 20) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, 4 MiB)``: decoded images (Pillow allocates them in 16 MB blocks)
    get their own mappings, returned to the OS when freed. With glibc's default sliding threshold
    they end up in per-thread heaps that keep the peak of every decode thread. Fixing the threshold
    also fixes the trim threshold, at 128 kB: a request's own buffers would then be handed back and
    faulted in again on every request, so it is raised to 32 MiB (glibc only; elsewhere a no-op)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(-3, threshold)) and bool(mallopt(-1, trim))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@dataclasses.dataclass(frozen=True)
class Loaded:
    predictor: Predictor
    loaded_at: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class ModelHolder:
    """Owns the model reference the requests use, and replaces it only with a bundle that loaded
    and answered a warm-up inference. Loads are serialised; reading :attr:`current` is one
    attribute read, so requests never wait for a load."""

    def __init__(
        self,
        settings: ServerSettings,
        metrics: Metrics,
        factory: Callable[[Path, PredictorOptions], Predictor] = Predictor,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.factory = factory
        self.current: Loaded | None = None
        self.last_error: dict[str, Any] | None = None
        self._failed: str | None = None  # the bundle that failed last; not retried until CURRENT moves
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loads = 0
        self._retired: list[weakref.ref[Predictor]] = []  # replaced models still held by in-flight requests

    def target(self) -> Path | None:
        if self.settings.bundle is not None:
            return self.settings.bundle
        assert self.settings.workdir is not None
        return current_bundle_dir(self.settings.workdir)

    def check(self, force: bool = False) -> bool:
        """Load the bundle CURRENT names if it is not the one serving. True when a new model was
        swapped in. Load failures are recorded (and raised when ``force``); the old model stays."""
        with self._load_lock:
            try:
                target = self.target()
            except CvmError as exc:  # CURRENT names something that is not a bundle
                if force:
                    self._record_failure(f"pointer: {exc}", exc)
                    raise
                if self._failed != f"pointer: {exc}":  # log once, not every poll
                    self._record_failure(f"pointer: {exc}", exc)
                return False
            if target is None:
                if force:
                    raise HTTPError(409, "no bundle has been published yet (run `cvm export`)")
                return False
            serving = self.current.predictor.bundle.path if self.current else None
            if not force and (str(target) == str(serving) or str(target) == self._failed):
                return False
            predictor = None
            # A rollback or a publish may move CURRENT while a bundle loads: never swap in one that
            # CURRENT no longer names, chase the pointer instead (a few times; then the poller goes on).
            for _ in range(MAX_POINTER_CHASES):
                predictor = self._load(target, force)
                if predictor is None:
                    return False
                fault_point("server_before_swap")
                moved = self._pointer_moved(target)
                if moved is None:
                    break
                log.info("CURRENT moved to %s while %s loaded; loading that instead", moved.name, target.name)
                predictor = None
                if str(moved) == str(serving) and not force:
                    return False  # it moved back to what is serving: nothing to swap
                target = moved
            if predictor is None:
                return False
            previous = self.current
            self.current = Loaded(predictor, _now())  # the swap: one reference
            if previous is not None:  # freed when its last request ends: then trim (below)
                self._retired.append(weakref.ref(previous.predictor, self._on_retired_freed))
            self._failed = None
            self.last_error = None
            self.metrics.set_model(predictor)
            if self.loads:
                self.metrics.reloads.labels(result="success").inc()
            self.loads += 1
            log.info(
                "serving bundle %s (%s, %d classes, providers %s)%s",
                predictor.name,
                predictor.bundle.precision,
                len(predictor.classes),
                ",".join(predictor.providers),
                f", replacing {previous.predictor.name}" if previous else "",
            )
            return True

    def _load(self, target: Path, force: bool) -> Predictor | None:
        """Load and warm ``target``; None (or a raise when ``force``) when it fails."""
        key = str(target)
        try:
            predictor = self.factory(target, self.settings.predictor)
            predictor.warmup()
        except CvmError as exc:
            self._record_failure(key, exc)
            if force:
                raise
            return None
        except Exception as exc:  # noqa: BLE001 - a broken bundle must never take the server down
            self._record_failure(key, ModelLoadError(f"bundle {target.name}: {exc}"))
            if force:
                raise ModelLoadError(f"bundle {target.name}: {exc}") from None
            return None
        return predictor

    def _pointer_moved(self, loaded: Path) -> Path | None:
        """The bundle CURRENT names now, when that is no longer ``loaded`` (None: it still is)."""
        if self.settings.bundle is not None:
            return None
        try:
            now = self.target()
        except CvmError:
            return None  # a broken pointer is the next poll's business; what loaded was CURRENT
        return None if now is None or str(now) == str(loaded) else now

    def _record_failure(self, key: str | None, exc: CvmError) -> None:
        self._failed = key
        serving = self.current.predictor.name if self.current else None
        self.last_error = {"bundle": key, "error": str(exc), "at": _now(), "still_serving": serving}
        self.metrics.reloads.labels(result="failure").inc()
        log.error("refused bundle %s: %s (still serving %s)", key, exc, serving or "nothing")

    def _poll(self) -> None:
        interval = self.settings.poll_interval_s
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # the poller must outlive any one bad bundle
                log.exception("bundle poll failed")
            self.release_retired()

    def _on_retired_freed(self, _: weakref.ref[Predictor]) -> None:
        # Runs in whichever thread dropped the last reference, as soon as it did: a server that
        # only reloads through the admin endpoint (or serves one fixed bundle) trims too.
        self.release_retired()

    def release_retired(self) -> bool:
        """Once every replaced model is gone (its last request finished), hand the memory it
        freed back to the OS. Without this, glibc keeps the freed heap of each old onnxruntime
        session and the RSS of a server that reloads often grows by about a model per reload."""
        if not self._retired or any(ref() is not None for ref in self._retired):
            return False
        self._retired.clear()
        return release_free_memory()

    def start(self) -> None:
        try:
            self.check()
        except Exception:  # start without a model; readiness says so
            log.exception("initial bundle load failed")
        if self.settings.workdir is not None and self.settings.poll_interval_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="cvm-bundle-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def require(self) -> Predictor:
        loaded = self.current
        if loaded is None:
            detail = f": {self.last_error['error']}" if self.last_error else ""
            raise HTTPError(503, f"no model loaded yet{detail}")
        return loaded.predictor


# ----- request bodies ----------------------------------------------------------------------------
async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes and with 408 when it
    has not arrived within ``timeout_s`` (a slow client would hold its socket forever). A client
    that hangs up mid-body raises :class:`ClientGone`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPError(400, "bad Content-Length header") from None
        if size > limit:
            raise HTTPError(413, f"request body of {size} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise HTTPError(413, f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientGone(f"the client closed the connection after {total} bytes of the body") from None
    return b"".join(chunks)


async def _one_chunk(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data
    yield b""


async def read_images(request: Request, settings: ServerSettings) -> list[tuple[str | None, bytes]]:
    """The images of a classify request: the raw body, or each multipart ``file`` part in order."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, settings.max_body_bytes, settings.request_timeout_s)
    if ctype == "multipart/form-data":
        parser = MultiPartParser(
            request.headers, _one_chunk(body), max_files=settings.max_files, max_fields=settings.max_files
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPError(400, f"bad multipart body: {exc.message}") from None
        except FormParserError as exc:
            # Starlette before 1.4 lets python-multipart's own parse errors through unwrapped.
            raise HTTPError(400, f"bad multipart body: {exc}") from None
        try:
            files = []
            for value in form.getlist("file"):
                if not isinstance(value, UploadFile):
                    raise HTTPError(422, "the 'file' part must be a file upload, not a text field")
                files.append((value.filename, await value.read()))
        finally:
            await form.close()
        if not files:
            raise HTTPError(422, "multipart body has no 'file' part")
        return files
    if ctype and ctype not in RAW_IMAGE_TYPES:
        raise UnsupportedImageError(
            f"unsupported Content-Type {ctype!r}: send an image (JPEG, PNG, WebP, BMP) as the body "
            "or as multipart/form-data 'file' parts"
        )
    if not body:
        raise DataError("empty request body: send an image")
    return [(None, body)]


MAX_TOP_K = 1000


def parse_top_k(raw: str | None, default: int) -> int:
    """The ``top_k`` query parameter, 1..1000, with the 422 texts FastAPI's validation gave it.
    Read here rather than declared: FastAPI's dependency solving was a measurable part of the
    request path (bench/server_latency.py)."""
    if raw is None:
        return default
    try:
        k = int(raw.strip())
    except ValueError:
        raise HTTPError(422, "top_k: Input should be a valid integer, unable to parse string as an integer") from None
    if k < 1:
        raise HTTPError(422, "top_k: Input should be greater than or equal to 1")
    if k > MAX_TOP_K:
        raise HTTPError(422, f"top_k: Input should be less than or equal to {MAX_TOP_K}")
    return k


def _finite(out: Outputs) -> Outputs:
    """Refuse outputs that overflowed (finite inputs near float32 max give inf/NaN logits): a 200
    with ``null`` scores is an answer no client can use."""
    if not (np.isfinite(out.logits).all() and np.isfinite(out.embedding).all()):
        raise HTTPError(
            422, "the model's outputs are not finite (overflow) for this input; inputs this large are outside its range"
        )
    return out


# ----- Open Inference Protocol v2 --------------------------------------------------------------
def _v2_inputs(predictor: Predictor, decoder: ImageDecoder, body: Any) -> tuple[np.ndarray, str | None, list[str]]:
    """The model input of a v2 infer request: float32 NCHW, the request id, the outputs wanted."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise HTTPError(400, "the request needs 'inputs': a list with one tensor")
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict):
        raise HTTPError(400, "each input must be an object with name, shape, datatype and data")
    shape, dtype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_V2_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise HTTPError(400, f"input 'shape' must be a list of at most {MAX_V2_DIMS} non-negative integers")
    if not isinstance(data, list | np.ndarray):  # an array: FP32 binary tensor data (deploy/oip_binary.py)
        raise HTTPError(400, "input 'data' must be a list (the JSON tensor encoding)")
    rid = body.get("id")
    wanted = V2_OUTPUTS if not body.get("outputs") else _v2_requested_outputs(body["outputs"])
    if dtype == "FP32":
        x = data if isinstance(data, np.ndarray) else _fp32_array(data)
        needed = math.prod(shape)  # exact: np.prod wraps around at 2**63 and lets a huge shape through
        if x.size != needed:
            raise HTTPError(400, f"FP32 data has {x.size} elements but shape {shape} needs {needed}")
        x = x.reshape(shape)
        if not np.isfinite(x).all():
            raise HTTPError(422, "FP32 data holds NaN or infinite values")
        try:
            x = predictor.check_input(x)
        except DataError as exc:
            raise HTTPError(400, str(exc)) from None
        return x, None if rid is None else str(rid), list(wanted)
    if dtype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] != len(data):
            raise HTTPError(400, f"BYTES input must have shape [B] or [B, 1] with B = {len(data)} elements")
        if not 1 <= len(data) <= predictor.options.max_batch:
            raise HTTPError(400, f"batch size must be 1..{predictor.options.max_batch}")
        images = []
        for i, item in enumerate(data):
            if isinstance(item, bytes):  # BYTES binary tensor data: the raw image
                images.append((f"element {i}", item))
                continue
            if not isinstance(item, str):
                raise HTTPError(400, f"BYTES element {i} must be a base64 string")
            try:
                images.append((f"element {i}", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise HTTPError(422, f"BYTES element {i} is not valid base64") from None
        pixels = decoder.decode_all(images, predictor.prep)
        return normalise(pixels, predictor.prep), None if rid is None else str(rid), list(wanted)
    raise HTTPError(
        400, f"input datatype must be FP32 (a [B, 3, H, W] tensor) or BYTES (encoded images), not {dtype!r}"
    )


def _fp32_array(data: list[Any]) -> np.ndarray:
    """JSON numbers (flat or nested lists) as float32; strings, booleans, nulls, objects, ragged
    lists and integers beyond float range are refused (400), not coerced or crashed on."""
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise HTTPError(400, "FP32 data must be numbers in flat or evenly nested lists") from None
    if raw.dtype.kind not in "iuf":  # object (ragged, huge ints, nulls), str, bool
        raise HTTPError(400, "FP32 data must be numbers in flat or evenly nested lists")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused below
        return raw.astype(np.float32)


def _v2_requested_outputs(outputs: Any) -> list[str]:
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise HTTPError(400, "'outputs' must be a list of objects with a 'name'")
    names = [str(o["name"]) for o in outputs]
    unknown = [n for n in names if n not in V2_OUTPUTS]
    if unknown:
        raise HTTPError(400, f"unknown output(s) {', '.join(unknown)[:200]}; this model has {', '.join(V2_OUTPUTS)}")
    repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if repeated:  # each copy would be serialised again: a small request, a huge answer
        raise HTTPError(400, f"output(s) {', '.join(repeated)} requested more than once")
    return names


def _v2_outputs(predictor: Predictor, out: Outputs, wanted: list[str]) -> list[dict[str, Any]]:
    b = len(out.logits)
    tensors: dict[str, Callable[[], dict[str, Any]]] = {
        "logits": lambda: _fp32("logits", out.logits),
        "probabilities": lambda: _fp32("probabilities", out.probabilities),
        "embedding": lambda: _fp32("embedding", out.embedding),
        "label": lambda: {
            "name": "label",
            "datatype": "BYTES",
            "shape": [b],
            "data": [predictor.classes[int(i)] for i in out.logits.argmax(1)],
        },
    }
    return [tensors[n]() for n in wanted]


def _fp32(name: str, a: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.astype(np.float32).ravel().tolist()}


def _v2_metadata(settings: ServerSettings, predictor: Predictor) -> dict[str, Any]:
    s = predictor.prep.image_size
    k = len(predictor.classes)
    emb = predictor.manifest.get("outputs", [{}, {"shape": [-1, -1]}])[1].get("shape", [-1, -1])
    return {
        "name": settings.model_name,
        "versions": [predictor.name],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, s, s]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "embedding", "datatype": "FP32", "shape": emb},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


# ----- app ---------------------------------------------------------------------------------------
def _history(workdir: Path | None, version: int) -> list[Any] | None:
    """The metrics history of the checkpoint a bundle came from (read as JSON: no torch here)."""
    if workdir is None:
        return None
    try:
        meta = json.loads((workdir / "checkpoints" / checkpoint_dir_name(version) / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    history = meta.get("history")
    return history if isinstance(history, list) else None


def create_app(settings: ServerSettings, holder: ModelHolder | None = None) -> FastAPI:
    """The FastAPI app for ``settings``; everything it uses hangs off the app (no module state)."""
    metrics = Metrics() if holder is None else holder.metrics
    holder = holder or ModelHolder(settings, metrics)
    decoder = ImageDecoder(settings.decode_limits())
    batch_settings = settings.batching()
    batcher = Batcher(batch_settings, metrics.batch_images.observe) if batch_settings.enabled else None
    # Decoding and inference run in this bounded pool, never in the event loop nor in the pool
    # that serves sync endpoints: health and metrics answer however many images are queued.
    pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="cvm-work")

    async def run_work(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(holder.start)
        try:
            yield
        finally:
            holder.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cvm-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.decoder = decoder
    app.state.batcher = batcher
    _install_error_handlers(app)
    openapi_doc.install(app)  # request bodies, error schema and statuses the routes really have
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]

    def check_name(name: str) -> None:
        if name != settings.model_name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {settings.model_name!r}")

    def check_version(request: Request, predictor: Predictor) -> None:
        """The ``/versions/{version}`` routes serve only the version being served now."""
        version = request.path_params.get("version")
        if version is not None and version != predictor.name:
            raise HTTPError(
                404, f"model {settings.model_name!r} has no version {version!r} here; it serves {predictor.name!r}"
            )

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        t0 = time.perf_counter()
        top_k = parse_top_k(request.query_params.get("top_k"), settings.default_top_k)
        images = await read_images(request, settings)
        predictor = holder.require()  # one reference for the whole request
        prep = predictor.prep

        def answer(out: Outputs) -> list[list[dict[str, Any]]]:
            return predictor.top_k(_finite(out), top_k)  # in the worker: the event loop only does I/O

        if batcher is None:  # one hop: decode, run and answer in one worker thread
            preds = await run_work(lambda: answer(predictor.run_pixels(decoder.decode_all(images, prep))))
        else:
            with batcher.admit(len(images)) as ticket:  # 503 when the batch queue is full
                # decode in a worker, which then runs the batch itself when a runner is free (the
                # future is done on return) or leaves it queued for the runner that is busy
                done = await run_work(
                    lambda: batcher.submit(ticket, predictor, normalise(decoder.decode_all(images, prep), prep), answer)
                )
                preds = done.result() if done.done() else await asyncio.wrap_future(done)
        metrics.images.inc(len(images))
        result: dict[str, Any] = {"model_version": predictor.name}
        if len(images) == 1:
            result["predictions"] = preds[0]
        else:
            result["results"] = [{"filename": f, "predictions": p} for (f, _), p in zip(images, preds, strict=True)]
        result["latency_ms"] = round(1000 * (time.perf_counter() - t0), 3)
        return JSONResponse(result)  # plain JSON types already: skips FastAPI's response encoding

    # The health, metadata and metrics endpoints are coroutines: they run on the event loop and take
    # no lock, so they never wait for a thread (decoding and inference hold those).
    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cvm-edge", "version": __version__, "extensions": [oip_binary.EXTENSION]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if holder.current is None:
            return JSONResponse({"ready": False, "error": "no model loaded"}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        check_name(name)
        predictor = holder.require()
        check_version(request, predictor)
        return _v2_metadata(settings, predictor)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, request: Request) -> Response:
        check_name(name)
        loaded = holder.current
        if loaded is not None:
            check_version(request, loaded.predictor)
        ok = loaded is not None
        body = {"name": name, "ready": ok} if ok else {"name": name, "ready": False, "error": "no model loaded"}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request) -> Response:
        check_name(name)
        raw = await read_body(request, settings.max_body_bytes, settings.request_timeout_s)
        predictor = holder.require()
        check_version(request, predictor)

        def work() -> tuple[int, Response]:  # parsing 10 MB of JSON is work too: not on the event loop
            # JSON or binary tensor data, maybe compressed (deploy/oip_binary.py)
            body = oip_binary.parse_request(raw, request.headers, settings.max_body_bytes, settings.predictor.max_batch)
            choice = oip_binary.binary_choice(body)
            x, rid, wanted = _v2_inputs(predictor, decoder, body)
            out = _finite(predictor.run(x))
            answer: dict[str, Any] = {"model_name": name, "model_version": predictor.name}
            if rid is not None:
                answer["id"] = rid
            answer["outputs"] = _v2_outputs(predictor, out, wanted)
            return len(out.logits), oip_binary.respond(answer, choice)

        n, response = await run_work(work)
        metrics.images.inc(n)
        return response

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        loaded = holder.current
        p = loaded.predictor if loaded else None
        return {
            "ready": p is not None,
            "model_name": settings.model_name,
            "model_version": p.name if p else None,
            "checkpoint_version": p.bundle.version if p else None,
            "precision": p.bundle.precision if p else None,
            "classes": p.classes if p else [],
            "providers": p.providers if p else [],
            "bundle_dir": str(p.bundle.path) if p else None,
            "loaded_at": loaded.loaded_at if loaded else None,
            "source": {"workdir": str(settings.workdir)} if settings.workdir else {"bundle": str(settings.bundle)},
            "manifest": p.manifest if p else None,
            "history": _history(settings.workdir, p.bundle.version) if p else None,
            # a checkpoint newer than the bundle means an export is missing (see firmware_notes/power-loss.md)
            "latest_checkpoint": read_pointer(settings.workdir / "checkpoints" / "LATEST")
            if settings.workdir
            else None,
            "last_reload_error": holder.last_error,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/admin/reload")
    async def admin_reload(request: Request) -> dict[str, Any]:
        token = settings.admin_token
        if not token:
            raise HTTPError(404, f"the admin endpoint is disabled (set {ADMIN_TOKEN_ENV} to enable it)")
        # The token is UTF-8 on both sides: HTTP hands header bytes over as latin-1 text, so encoding
        # it back as latin-1 gives the bytes the client sent, compared with the token's UTF-8 bytes.
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        sent = value.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, token.encode("utf-8", "surrogateescape")):
            raise HTTPError(401, "a valid 'Authorization: Bearer <token>' header is required")
        before = holder.current.predictor.name if holder.current else None
        await run_in_threadpool(holder.check, True)
        after = holder.require().name
        return {"reloaded": True, "model_version": after, "previous_version": before}

    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def cvm_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "http_status", 500)
        if status == CLIENT_GONE:  # nobody to answer: count it, log one line, no traceback
            request.app.state.metrics.disconnects.inc()
            log.info("client disconnected: %s", exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status >= 500:
            log.error("request failed: %s", exc)
        return _error(status, str(exc), headers)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _error(exc.status_code, str(exc.detail), dict(exc.headers) if exc.headers else None)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return _error(422, "; ".join(parts) or "invalid request")

    async def internal_error(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal server error")

    app.add_exception_handler(CvmError, cvm_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def serve(settings: ServerSettings) -> None:
    """Run the server in this process until SIGINT/SIGTERM."""
    import uvicorn

    from deploy.httpproto import event_loop, protocol_class

    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the server is reachable from other machines", settings.host)
    use_mmap_for_large_buffers()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        # our subclass of uvicorn's httptools (or h11) protocol with the connection limits
        # (deploy/httpproto.py); uvloop when installed: about 0.1 ms less per request together
        http=protocol_class(settings.request_timeout_s, settings.max_connections, settings.http_parser),
        loop=event_loop(settings.event_loop),
        timeout_keep_alive=5,
        access_log=settings.access_log,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
