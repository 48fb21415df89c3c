"""Dynamic batching: requests that arrive within a short window run as one onnxruntime call.

As Triton's dynamic batcher, with two differences that suit a small CPU box:

- No batcher thread. The worker thread that decoded a request runs the batch itself when a runner
  slot is free (so a lone request costs no extra thread hop), gathers whatever else is queued, and
  keeps draining the queue before it gives the slot back. Requests that find every slot busy queue
  and are answered by a running slot.
- The window is only waited for when more requests are on their way: requests admitted and still
  being decoded. A lone request never waits, so batching costs single-stream latency nothing.

Memory stays bounded: every image is counted from admission (before its decode) until its answer,
and a request that would take the count over ``max_queued_images`` is refused with a 503 at once.
Errors stay per request: a batch whose run fails is run again one request at a time, and each
request's answer is checked (``finish``) on its own rows.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from cvm_edge.errors import CvmError

T = TypeVar("T")


class _Runs(Protocol):
    def run(self, x: np.ndarray) -> Any: ...


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    window_ms: float = 2.0  # how long a batch waits for requests still being decoded; 0: batching off
    max_images: int = 16  # images per onnxruntime call
    max_queued_images: int = 256  # admitted and not yet answered; more: 503
    runners: int = 1  # batches running at once

    def __post_init__(self) -> None:
        if not self.window_ms >= 0 or self.max_images < 1 or self.runners < 1:
            raise ValueError("batch window must be >= 0, batch size and runners >= 1")
        if self.max_queued_images < self.max_images:
            raise ValueError("the batch queue must hold at least one full batch")

    @property
    def enabled(self) -> bool:
        return self.window_ms > 0


class QueueFull(CvmError):
    """More images are waiting than the batch queue holds."""

    http_status = 503


@dataclasses.dataclass
class _Item(Generic[T]):
    model: _Runs
    x: np.ndarray
    finish: Callable[[Any], T]
    future: Future[T]
    ticket: Ticket
    arrived: float


class Ticket:
    """One admitted request: its images count against the queue until it is answered or dropped."""

    def __init__(self, batcher: Batcher, images: int) -> None:
        self.batcher = batcher
        self.images = images
        self.submitted = False
        self.released = False


def _split(out: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every array field of a model output (a dataclass of arrays)."""
    fields = {f.name: getattr(out, f.name)[start:stop] for f in dataclasses.fields(out)}
    return dataclasses.replace(out, **fields)


class Batcher:
    """See the module docstring. One per app; thread-safe."""

    def __init__(self, settings: BatchSettings, observe: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.observe = observe or (lambda n: None)  # images per model run (a metric)
        self._cond = threading.Condition()
        self._queue: deque[_Item[Any]] = deque()
        self._admitted = 0  # images admitted and not yet answered (the memory bound)
        self._decoding = 0  # images admitted and not yet submitted: worth waiting for
        self._free_runners = settings.runners
        self._gathering = False  # a runner is waiting out the window: newcomers join its batch

    # ----- admission ------------------------------------------------------------------------------
    @contextmanager
    def admit(self, images: int) -> Iterator[Ticket]:
        """Count ``images`` from now (503 when the queue is full); a ticket that is never submitted
        (its decode failed) is dropped on exit."""
        with self._cond:
            if self._admitted + images > self.settings.max_queued_images:
                raise QueueFull(
                    f"the server is busy: {self._admitted} images are queued for inference "
                    f"(limit {self.settings.max_queued_images}); retry shortly"
                )
            self._admitted += images
            self._decoding += images
        ticket = Ticket(self, images)
        try:
            yield ticket
        finally:
            if not ticket.submitted:
                with self._cond:
                    self._decoding -= images
                    self._release(ticket)
                    self._cond.notify_all()

    def _release(self, ticket: Ticket) -> None:  # under the lock
        if not ticket.released:
            ticket.released = True
            self._admitted -= ticket.images

    @property
    def queued_images(self) -> int:
        return self._admitted

    # ----- submission -----------------------------------------------------------------------------
    def submit(self, ticket: Ticket, model: _Runs, x: np.ndarray, finish: Callable[[Any], T]) -> Future[T]:
        """Queue ``x`` (the ticket's decoded, normalised images) for ``model``. When a runner slot is
        free the calling thread runs batches until the queue is empty, its own request first; the
        future is then done when this returns. ``finish`` turns the request's rows into its answer
        (it runs in the runner thread; what it raises is that request's error alone)."""
        future: Future[T] = Future()
        item = _Item(model, x, finish, future, ticket, time.monotonic())
        with self._cond:
            if ticket.submitted:
                raise RuntimeError("a ticket is submitted once")
            ticket.submitted = True
            self._decoding -= ticket.images
            self._queue.append(item)
            lead = self._free_runners > 0 and not self._gathering
            if lead:
                self._free_runners -= 1
            else:
                self._cond.notify_all()  # a gathering runner may be waiting for this one
        if lead:
            self._drain()
        return future

    def _drain(self) -> None:
        """Run batches until the queue is empty, then give the runner slot back."""
        while True:
            with self._cond:
                batch = self._gather()
                if not batch:
                    self._free_runners += 1
                    return
            self._run(batch)

    def _gather(self) -> list[_Item[Any]]:
        """The next batch (under the lock): the head request and those after it for the same model,
        up to ``max_images``; waits out the head's window while more requests are being decoded."""
        s = self.settings
        if not self._queue:
            return []
        deadline = self._queue[0].arrived + s.window_ms / 1000.0
        self._gathering = True
        try:
            while True:
                batch, images = self._take_candidates()
                remaining = deadline - time.monotonic()
                if images >= s.max_images or self._decoding == 0 or remaining <= 0:
                    break
                self._cond.wait(remaining)
        finally:
            self._gathering = False
        for item in batch:
            self._queue.remove(item)
        return batch

    def _take_candidates(self) -> tuple[list[_Item[Any]], int]:
        head = self._queue[0]
        batch, images = [head], len(head.x)
        for item in list(self._queue)[1:]:
            if item.model is head.model and images + len(item.x) <= self.settings.max_images:
                batch.append(item)
                images += len(item.x)
        return batch, images

    # ----- running ----------------------------------------------------------------------------------
    def _run(self, batch: list[_Item[Any]]) -> None:
        model = batch[0].model
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch])
            self.observe(len(x))
            out = model.run(x)
        except Exception as exc:  # noqa: BLE001 - the batch failed: find out whose rows did it
            if len(batch) == 1:
                self._settle(batch[0], None, exc)
            else:
                for item in batch:  # one at a time: each request gets its own answer or error
                    try:
                        alone = item.model.run(item.x)
                    except Exception as own:  # noqa: BLE001 - this request's error
                        self._settle(item, None, own)
                    else:
                        self._settle(item, alone, None)
            return
        start = 0
        for item in batch:
            stop = start + len(item.x)
            self._settle(item, out if len(batch) == 1 else _split(out, start, stop), None)
            start = stop

    def _settle(self, item: _Item[Any], out: Any, error: BaseException | None) -> None:
        """Answer one request: ``finish`` its rows (what that raises is its own error), give its
        queue places back, then complete its future."""
        result: Any = None
        if error is None:
            try:
                result = item.finish(out)
            except Exception as exc:  # noqa: BLE001 - handed to the request that caused it
                error = exc
        with self._cond:
            self._release(item.ticket)
            self._cond.notify_all()
        if error is None:
            item.future.set_result(result)
        else:
            item.future.set_exception(error)
