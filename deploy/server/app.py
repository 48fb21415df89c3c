"""The app: :func:`create_app` wires settings, model holder, metrics and the route modules
together, and :func:`serve` runs it on uvicorn. Wiring only; each job lives in its own module."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from cvm_edge import __version__
from deploy import openapi_doc
from deploy.batching import Batcher
from deploy.imagedecode import ImageDecoder
from deploy.server import v1, v2
from deploy.server.context import Serving
from deploy.server.errors import install_error_handlers
from deploy.server.holder import ModelHolder, use_mmap_for_large_buffers
from deploy.server.metrics import Metrics, MetricsMiddleware, add_metrics_route
from deploy.server.settings import ServerSettings

log = logging.getLogger("deploy.server")  # the package's one logger name (see errors.py)


def create_app(settings: ServerSettings, holder: ModelHolder | None = None) -> FastAPI:
    """The FastAPI app for ``settings``; everything it uses hangs off the app (no module state)."""
    metrics = Metrics() if holder is None else holder.metrics
    holder = holder or ModelHolder(settings, metrics)
    batching = settings.batching()
    serving = Serving(
        settings=settings,
        holder=holder,
        metrics=metrics,
        decoder=ImageDecoder(settings.decode_limits()),
        batcher=Batcher(batching, metrics.batch_images.observe) if batching.enabled else None,
        pool=ThreadPoolExecutor(settings.threads, thread_name_prefix="cvm-work"),
    )
    app = FastAPI(title="cvm-edge", version=__version__, lifespan=_lifespan(serving), docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics  # the error handlers count disconnects in it
    app.state.decoder = serving.decoder
    app.state.batcher = serving.batcher
    install_error_handlers(app)
    openapi_doc.install(app)  # request bodies, error schema and statuses the routes really have
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    # Registered in the order they always had: it is the order of the paths in /openapi.json.
    v1.add_classify(app, serving)
    v2.add_routes(app, serving)
    v1.add_model_info(app, serving)
    add_metrics_route(app, metrics)
    v1.add_admin(app, serving)
    return app


def _lifespan(serving: Serving) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Load the first bundle (and start the poller) before the first request; stop both on exit."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(serving.holder.start)
        try:
            yield
        finally:
            serving.holder.stop()
            serving.pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


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
