"""Reading request bodies off the wire under the server's limits: the size (413), the time it may
take to arrive (408), a client that hangs up (:class:`ClientGone`), and the images of a classify
request (a raw body or multipart ``file`` parts)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from cvm_edge.errors import DataError
from cvm_edge.preprocess import UnsupportedImageError
from deploy.server.errors import ClientGone, HTTPError
from deploy.server.settings import ServerSettings

RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp", "application/octet-stream")


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
