"""Errors as HTTP answers: every error is ``{"error": "..."}`` with its status, whichever layer
raised it (a :class:`~cvm_edge.errors.CvmError` carries its own ``http_status``)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvm_edge.errors import CvmError

# One logger name for the whole package: log lines (and filters on them) read as before the split.
log = logging.getLogger("deploy.server")

CLIENT_GONE = 499  # nginx's status for "the client closed the connection"; never sent, only counted


class HTTPError(CvmError):
    """An error answered with a given status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class ClientGone(CvmError):
    """The client closed the connection before its request body was complete."""

    http_status = CLIENT_GONE


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer our errors, Starlette's and FastAPI's validation errors, and anything unexpected, all
    in the one ``{"error": ...}`` shape (the schema /openapi.json documents)."""

    async def cvm_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "http_status", 500)
        if status == CLIENT_GONE:  # nobody to answer: count it, log one line, no traceback
            request.app.state.metrics.disconnects.inc()
            log.info("client disconnected: %s", exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status >= 500:
            log.error("request failed: %s", exc)
        return error_response(status, str(exc), headers)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers) if exc.headers else None)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return error_response(422, "; ".join(parts) or "invalid request")

    async def internal_error(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error")

    app.add_exception_handler(CvmError, cvm_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
