"""uvicorn's h11 protocol with the limits a server facing slow or hostile clients needs.

uvicorn (0.54) arms no timer while a connection's request headers arrive, so a client that sends
one header byte a minute holds its socket for ever; enough of them exhaust the open-file limit and
every health check fails. This subclass:

- closes a connection whose request headers are not complete within ``header_timeout_s`` of its
  opening (or of the previous response) with a JSON 408; the body has its own deadline in the app;
- closes a connection at once, with a JSON 503, when ``max_connections`` are already open;
- answers the requests h11 refuses (malformed request line or headers, headers over h11's size
  limit) with a JSON 400 ``{"error": ...}`` instead of uvicorn's text/plain.

uvicorn's own text/plain 503 "Service Unavailable" for ``limit_concurrency`` remains (see
RELIABILITY.md); ``max_connections`` here is checked first and answers JSON.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def _json_error(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


class LimitedH11Protocol(H11Protocol):
    """See the module docstring. Subclass with :func:`protocol_class` to set the limits."""

    header_timeout_s: float = 30.0
    max_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self.logger.warning(
                "refused a connection: %d are open (limit %d)", len(self.connections), self.max_connections
            )
            self._send_and_close(503, f"too many open connections (limit {self.max_connections}); retry later")
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # headers complete: the body's deadline is the app's
        if self.conn.our_state is h11.IDLE:
            self._send_and_close(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """What uvicorn does after h11 refused the request (h11 still allows a response), in JSON."""
        headers, body = _json_error(400, f"invalid HTTP request: {msg}")
        try:
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # h11 cannot answer in this state: just close
            pass
        self.transport.close()

    def _send_and_close(self, status: int, message: str) -> None:
        """Answer before any request was read (h11 only answers requests), then close."""
        headers, body = _json_error(status, message)
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        self.transport.write(head + b"\r\n" + body)
        self.transport.close()


def protocol_class(header_timeout_s: float, max_connections: int) -> type[LimitedH11Protocol]:
    """A :class:`LimitedH11Protocol` with these limits (uvicorn takes a class, not an instance)."""
    attrs: dict[str, Any] = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type("CvmH11Protocol", (LimitedH11Protocol,), attrs)
