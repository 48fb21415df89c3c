"""What the routes of one app share, built once by :func:`deploy.server.app.create_app` and handed
to each route module: no module-level state, so two apps in one process never share a model,
a metric or a thread pool."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from deploy.batching import Batcher
from deploy.imagedecode import ImageDecoder
from deploy.server.holder import ModelHolder
from deploy.server.metrics import Metrics
from deploy.server.settings import ServerSettings

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, eq=False)
class Serving:
    settings: ServerSettings
    holder: ModelHolder
    metrics: Metrics
    decoder: ImageDecoder  # one per app: its memory budget bounds every decode in flight
    batcher: Batcher | None  # None: dynamic batching of /v1/classify is off
    # Decoding and inference run in this bounded pool, never in the event loop nor in the pool
    # that serves sync endpoints: health and metrics answer however many images are queued.
    pool: ThreadPoolExecutor

    async def run_work(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
