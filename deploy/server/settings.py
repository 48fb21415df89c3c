"""The server's settings: one frozen dataclass, checked when it is made, so a bad value stops the
server at start-up instead of failing the first request that needs it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from deploy.batching import BatchSettings
from deploy.imagedecode import DecodeLimits
from deploy.predictor import PredictorOptions

ADMIN_TOKEN_ENV = (
    "CVM_ADMIN_TOKEN"  # `cvm serve` reads the admin token from it (deploy/commands.py); unset or empty: off
)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    workdir: Path | None = None  # serve <workdir>/bundles/CURRENT and follow it
    bundle: Path | None = None  # or one fixed bundle directory
    host: str = "127.0.0.1"
    port: int = 8080
    predictor: PredictorOptions = dataclasses.field(default_factory=PredictorOptions)
    poll_interval_s: float = 1.0  # 0 disables polling (reload through the admin endpoint only)
    max_body_bytes: int = 10 << 20
    max_files: int = 32
    default_top_k: int = 5
    model_name: str = "cvm"
    admin_token: str | None = None
    access_log: bool = True
    max_request_pixels: int = DecodeLimits.max_request_pixels
    max_aspect_ratio: float = DecodeLimits.max_aspect_ratio
    decode_memory_bytes: int = DecodeLimits.memory_bytes
    worker_threads: int = 0  # decode + inference threads; 0: min(8, 2 x CPUs)
    request_timeout_s: float = 30.0  # to receive a request's headers, and (separately) its body
    max_connections: int = 512  # open connections; more are closed at once (keep under LimitNOFILE)
    # Dynamic batching of /v1/classify (deploy/batching.py): how long a batch waits for requests
    # still being decoded (0: off), images per onnxruntime call, images admitted and unanswered
    # (more: 503), batches run at once (0: CPUs / intra-op threads, at most worker threads - 1).
    batch_window_ms: float = 0.0  # off: no throughput gain measured on a 2-core CPU (bench/server_latency.py)
    batch_max_images: int = 16
    batch_queue_images: int = 256
    batch_runners: int = 0
    http_parser: str = "auto"  # httptools (C) when installed, else h11; deploy/httpproto.py
    event_loop: str = "auto"  # uvloop when installed, else asyncio

    def __post_init__(self) -> None:
        if (self.workdir is None) == (self.bundle is None):
            raise ValueError("give exactly one of workdir and bundle")
        if self.poll_interval_s < 0 or self.max_body_bytes < 1 or self.max_files < 1:
            raise ValueError("poll interval, body limit and file limit must be positive")
        if self.worker_threads < 0 or not self.request_timeout_s > 0 or self.max_connections < 1:
            raise ValueError("worker threads must be >= 0; request timeout and connection limit positive")
        self.decode_limits()  # validates them
        if self.batching().max_queued_images < self.max_files:
            raise ValueError("the batch queue must hold the images of the largest request (max_files)")
        if self.batch_max_images > self.predictor.max_batch:
            raise ValueError("the dynamic batch cannot be larger than the model's max batch")
        if self.http_parser not in ("auto", "httptools", "h11") or self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise ValueError("http_parser is auto, httptools or h11; event_loop auto, uvloop or asyncio")

    @property
    def threads(self) -> int:
        return self.worker_threads or min(8, 2 * (os.cpu_count() or 1))

    def batching(self) -> BatchSettings:
        runners = self.batch_runners
        if runners == 0:
            intra = self.predictor.intra_op_threads
            runners = max(1, (os.cpu_count() or 1) // intra) if intra else 1
            runners = max(1, min(runners, self.threads - 1))  # leave a worker thread to decode
        return BatchSettings(
            window_ms=self.batch_window_ms,
            max_images=self.batch_max_images,
            max_queued_images=self.batch_queue_images,
            runners=runners,
        )

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_pixels=self.max_pixels,
            max_request_pixels=self.max_request_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            memory_bytes=self.decode_memory_bytes,
        )

    @property
    def max_pixels(self) -> int:
        return self.predictor.max_pixels
