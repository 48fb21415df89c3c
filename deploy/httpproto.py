"""uvicorn's HTTP protocols with the limits a server facing slow or hostile clients needs.

uvicorn (0.49) arms no timer while a connection's request headers arrive, so a client that sends
one header byte a minute holds its socket for ever; enough of them exhaust the open-file limit and
every health check fails. The subclasses here (of the httptools protocol, uvicorn's fast C parser,
and of the pure-Python h11 one, used when httptools is not installed):

- close a connection whose request headers are not complete within ``header_timeout_s`` of its
  opening (or of the previous response) with a JSON 408; the body has its own deadline in the app;
- close a connection at once, with a JSON 503, when ``max_connections`` are already open;
- answer the requests the parser refuses (malformed request line or headers, headers over
  ``max_header_bytes``) with a JSON 400 ``{"error": ...}`` instead of uvicorn's text/plain.
  h11 has its own 16 KiB limit; llhttp (httptools) has none, so the httptools protocol counts.

uvicorn's own text/plain 503 "Service Unavailable" for ``limit_concurrency`` remains (see
RELIABILITY.md); ``max_connections`` here is checked first and answers JSON.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11's own default limit, kept for httptools too


def _json_error(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


def _raw_json_error(status: int, message: str) -> bytes:
    headers, body = _json_error(status, message)
    head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"\r\n" + body


class _Limits:
    """The header deadline and the connection limit, shared by both protocols. The protocol calls
    :meth:`_arm_header_timer` when it waits for a request's headers and :meth:`_cancel_header_timer`
    once they are complete; :meth:`_headers_pending` says which of the two it is."""

    header_timeout_s: float = 30.0
    max_connections: int = 512
    max_header_bytes: int = MAX_HEADER_BYTES
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    logger: Any
    _header_timer: asyncio.TimerHandle | None = None

    def _admit(self) -> bool:
        """Called from ``connection_made``: False (and the connection answered 503) when over the limit."""
        if len(self.connections) > self.max_connections:
            self.logger.warning(
                "refused a connection: %d are open (limit %d)", len(self.connections), self.max_connections
            )
            self._send_and_close(503, f"too many open connections (limit {self.max_connections}); retry later")
            return False
        self._arm_header_timer()
        return True

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = self._header_timer
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_pending(self) -> bool:
        raise NotImplementedError

    def _response_started(self) -> bool:
        raise NotImplementedError

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._headers_pending():
            return  # headers complete: the body's deadline is the app's
        if not self._response_started():
            self._send_and_close(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self.transport.close()

    def _send_and_close(self, status: int, message: str) -> None:
        """Answer outside any request cycle (before one was read, or after the parser refused it), then close."""
        self.transport.write(_raw_json_error(status, message))
        self.transport.close()


class LimitedH11Protocol(_Limits, H11Protocol):
    """See the module docstring (h11, pure Python). Subclass with :func:`protocol_class` to set the limits."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = None
        self._admit()

    def _headers_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _response_started(self) -> bool:
        return self.conn.our_state is not h11.IDLE

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


def _httptools_protocol() -> type[Any] | None:
    """The httptools subclass, or None when httptools (uvicorn[standard]) is not installed."""
    if importlib.util.find_spec("httptools") is None:
        return None
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(_Limits, HttpToolsProtocol):
        """See the module docstring (httptools: llhttp, C). About 0.1 ms less per request than h11
        (bench/server_latency.py)."""

        _awaiting_headers = True
        _header_bytes = 0  # request line and headers parsed so far
        _pending_bytes = 0  # bytes read since the headers were awaited

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = None
            self._awaiting_headers, self._header_bytes, self._pending_bytes = True, 0, 0
            self._admit()

        def _headers_pending(self) -> bool:
            return self._awaiting_headers

        def _response_started(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            # llhttp keeps no limit of its own. The parsed request line and headers are counted in
            # the callbacks (a whole oversized block can come in one read); the raw bytes of headers
            # still incomplete after a read too (httptools buffers a header until it ends)
            if self._awaiting_headers:
                self._pending_bytes += len(data)
            super().data_received(data)
            if self._awaiting_headers and self._pending_bytes > self.max_header_bytes:
                self.send_400_response("too long")

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > self.max_header_bytes:
                raise ValueError("request headers too long")  # httptools stops: uvicorn's 400 path

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting_headers, self._header_bytes = True, 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._awaiting_headers, self._pending_bytes = False, 0
            self._cancel_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            draining = self.cycle is not None and self.cycle.more_body
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if draining:
                # answered before its body was complete (413, 408): the rest of the body is read and
                # dropped (closing now could reset the connection under the answer), within the
                # header deadline; then the next request's headers get theirs
                self._awaiting_headers = False
                self._cancel_header_timer()
                self._header_timer = self.loop.call_later(self.header_timeout_s, self.transport.close)
            else:
                self._awaiting_headers, self._pending_bytes = True, 0
                self._arm_header_timer()  # the next request's headers get the same deadline

        def on_message_complete(self) -> None:
            answered = self.cycle is not None and self.cycle.response_complete
            super().on_message_complete()
            if answered and not self.transport.is_closing():  # the rest of an answered body is in
                self._awaiting_headers, self._pending_bytes = True, 0
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to what llhttp refuses, in JSON (no request cycle exists for it)."""
            if self.transport.is_closing():
                return
            if max(self._header_bytes, self._pending_bytes) > self.max_header_bytes:
                msg = f"request line and headers over {self.max_header_bytes} bytes"
            self._send_and_close(400, f"invalid HTTP request: {msg}")

    return LimitedHttpToolsProtocol


def protocol_class(
    header_timeout_s: float, max_connections: int, parser: str = "auto"
) -> type[LimitedH11Protocol] | type[Any]:
    """The limited protocol class with these limits (uvicorn takes a class, not an instance).
    ``parser``: "httptools", "h11", or "auto" (httptools when installed, else h11)."""
    if parser not in ("auto", "httptools", "h11"):
        raise ValueError(f"parser must be auto, httptools or h11, not {parser!r}")
    base: type[Any] | None = None if parser == "h11" else _httptools_protocol()
    if base is None:
        if parser == "httptools":
            raise ValueError("the httptools parser is not installed (pip install httptools)")
        base = LimitedH11Protocol
    attrs: dict[str, Any] = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
    return type(f"Cvm{base.__name__.removeprefix('Limited')}", (base,), attrs)


def event_loop(kind: str = "auto") -> str:
    """uvicorn's ``loop`` setting: "uvloop" when asked or ("auto") installed, else "asyncio"."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"loop must be auto, uvloop or asyncio, not {kind!r}")
    if kind == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if kind == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed (pip install uvloop)")
    return kind
