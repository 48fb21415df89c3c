"""Handing freed memory back to the operating system between the big steps of an update."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    return trim  # type: ignore[no-any-return]


def release_freed_memory() -> None:
    """glibc keeps freed heap pages (torch's and onnxruntime's activations, numpy temporaries) in the
    process after a step ends, and raises its mmap threshold after large frees, so the next step's peak
    RSS stacks on top of the last one's; ``malloc_trim(0)`` returns them (measured: ~130 MB after
    the analytic update's feature pass). A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
