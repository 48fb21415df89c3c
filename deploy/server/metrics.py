"""Prometheus metrics: their registry (one per app, never the global one), the middleware that
counts and times every request, and the ``/metrics`` route that exports them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deploy.predictor import Predictor

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


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


def add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    """``GET /metrics``: a coroutine, so it runs on the event loop and never waits for a thread
    (decoding and inference hold those)."""

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
