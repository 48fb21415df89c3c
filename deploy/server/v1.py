"""The v1 routes (this server's own API, beside the OIP v2 ones): ``POST /v1/classify`` (one image
as the raw body, or multipart ``file`` parts), ``GET /v1/model`` and ``POST /v1/admin/reload``
(bearer token). The Predictor turns the images into answers; these routes read, admit and reply."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cvm_edge.fsutil import read_pointer
from cvm_edge.workdir import layout
from deploy.bundle import checkpoint_dir_name
from deploy.predictor import Outputs
from deploy.server.body import read_images
from deploy.server.context import Serving
from deploy.server.errors import HTTPError
from deploy.server.settings import ADMIN_TOKEN_ENV

MAX_TOP_K = 1000


def add_classify(app: FastAPI, serving: Serving) -> None:
    """``POST /v1/classify``: decode, run and answer in the work pool, through the batcher when on."""
    settings, holder, decoder, batcher = serving.settings, serving.holder, serving.decoder, serving.batcher

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        t0 = time.perf_counter()
        top_k = parse_top_k(request.query_params.get("top_k"), settings.default_top_k)
        images = await read_images(request, settings)
        predictor = holder.require()  # one reference for the whole request

        def answer(out: Outputs) -> list[list[dict[str, Any]]]:
            return predictor.top_k(out.require_finite(), top_k)  # in the worker: the event loop only does I/O

        if batcher is None:  # one hop: decode, run and answer in one worker thread
            preds = await serving.run_work(lambda: answer(predictor.run(predictor.images_input(images, decoder))))
        else:
            with batcher.admit(len(images)) as ticket:  # 503 when the batch queue is full
                # decode in a worker, which then runs the batch itself when a runner is free (the
                # future is done on return) or leaves it queued for the runner that is busy
                done = await serving.run_work(
                    lambda: batcher.submit(ticket, predictor, predictor.images_input(images, decoder), answer)
                )
                preds = done.result() if done.done() else await asyncio.wrap_future(done)
        serving.metrics.images.inc(len(images))
        result: dict[str, Any] = {"model_version": predictor.name}
        if len(images) == 1:
            result["predictions"] = preds[0]
        else:
            result["results"] = [{"filename": f, "predictions": p} for (f, _), p in zip(images, preds, strict=True)]
        result["latency_ms"] = round(1000 * (time.perf_counter() - t0), 3)
        return JSONResponse(result)  # plain JSON types already: skips FastAPI's response encoding


def add_model_info(app: FastAPI, serving: Serving) -> None:
    """``GET /v1/model``: what is served, where it came from, and the last refused reload."""
    settings, holder = serving.settings, serving.holder

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
            "latest_checkpoint": read_pointer(layout(settings.workdir).latest) if settings.workdir else None,
            "last_reload_error": holder.last_error,
            # what the Predictor warned at load (an int8 bundle whose weights do not suit this CPU)
            "warnings": [w for w in (p.int8_warning,) if w] if p else [],
        }


def add_admin(app: FastAPI, serving: Serving) -> None:
    """``POST /v1/admin/reload``: a forced reload, behind a bearer token (404 when none is set)."""
    settings, holder = serving.settings, serving.holder

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


def _history(workdir: Path | None, version: int) -> list[Any] | None:
    """The metrics history of the checkpoint a bundle came from (read as JSON: no torch here)."""
    if workdir is None:
        return None
    try:
        meta = json.loads((layout(workdir).version_dir(checkpoint_dir_name(version)) / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    history = meta.get("history")
    return history if isinstance(history, list) else None
