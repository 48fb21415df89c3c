"""The model being served: :class:`ModelHolder` loads and warms a bundle off the request path and
swaps one reference, follows the store's ``CURRENT`` pointer (publish, rollback) in a background
thread, refuses a bundle that fails to load (the old one keeps serving), and hands the memory of
replaced models back to the OS once their last request is done."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime as dt
import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvm_edge.errors import CvmError, ModelLoadError
from cvm_edge.fsutil import fault_point
from deploy.bundle import current_bundle_dir
from deploy.predictor import Predictor, PredictorOptions
from deploy.server.errors import HTTPError
from deploy.server.metrics import Metrics
from deploy.server.settings import ServerSettings

log = logging.getLogger("deploy.server")  # the package's one logger name (see errors.py)

MAX_POINTER_CHASES = 3


def release_free_memory() -> bool:
    """``malloc_trim(0)``: return free heap pages to the OS (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def use_mmap_for_large_buffers(threshold: int = 4 << 20, trim: int = 32 << 20) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, 4 MiB)``: decoded images (Pillow allocates them in 16 MB blocks)
    get their own mappings, returned to the OS when freed. With glibc's default sliding threshold
    they end up in per-thread heaps that keep the peak of every decode thread. Fixing the threshold
    also fixes the trim threshold, at 128 kB: a request's own buffers would then be handed back and
    faulted in again on every request, so it is raised to 32 MiB (glibc only; elsewhere a no-op)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(-3, threshold)) and bool(mallopt(-1, trim))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@dataclasses.dataclass(frozen=True)
class Loaded:
    predictor: Predictor
    loaded_at: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class ModelHolder:
    """Owns the model reference the requests use, and replaces it only with a bundle that loaded
    and answered a warm-up inference. Loads are serialised; reading :attr:`current` is one
    attribute read, so requests never wait for a load."""

    def __init__(
        self,
        settings: ServerSettings,
        metrics: Metrics,
        factory: Callable[[Path, PredictorOptions], Predictor] = Predictor,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.factory = factory
        self.current: Loaded | None = None
        self.last_error: dict[str, Any] | None = None
        self._failed: str | None = None  # the bundle that failed last; not retried until CURRENT moves
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loads = 0
        self._retired: list[weakref.ref[Predictor]] = []  # replaced models still held by in-flight requests

    def target(self) -> Path | None:
        if self.settings.bundle is not None:
            return self.settings.bundle
        assert self.settings.workdir is not None
        return current_bundle_dir(self.settings.workdir)

    def check(self, force: bool = False) -> bool:
        """Load the bundle CURRENT names if it is not the one serving. True when a new model was
        swapped in. Load failures are recorded (and raised when ``force``); the old model stays."""
        with self._load_lock:
            try:
                target = self.target()
            except CvmError as exc:  # CURRENT names something that is not a bundle
                if force:
                    self._record_failure(f"pointer: {exc}", exc)
                    raise
                if self._failed != f"pointer: {exc}":  # log once, not every poll
                    self._record_failure(f"pointer: {exc}", exc)
                return False
            if target is None:
                if force:
                    raise HTTPError(409, "no bundle has been published yet (run `cvm export`)")
                return False
            serving = self.current.predictor.bundle.path if self.current else None
            if not force and (str(target) == str(serving) or str(target) == self._failed):
                return False
            predictor = None
            # A rollback or a publish may move CURRENT while a bundle loads: never swap in one that
            # CURRENT no longer names, chase the pointer instead (a few times; then the poller goes on).
            for _ in range(MAX_POINTER_CHASES):
                predictor = self._load(target, force)
                if predictor is None:
                    return False
                fault_point("server_before_swap")
                moved = self._pointer_moved(target)
                if moved is None:
                    break
                log.info("CURRENT moved to %s while %s loaded; loading that instead", moved.name, target.name)
                predictor = None
                if str(moved) == str(serving) and not force:
                    return False  # it moved back to what is serving: nothing to swap
                target = moved
            if predictor is None:
                return False
            previous = self.current
            self.current = Loaded(predictor, _now())  # the swap: one reference
            if previous is not None:  # freed when its last request ends: then trim (below)
                self._retired.append(weakref.ref(previous.predictor, self._on_retired_freed))
            self._failed = None
            self.last_error = None
            self.metrics.set_model(predictor)
            if self.loads:
                self.metrics.reloads.labels(result="success").inc()
            self.loads += 1
            log.info(
                "serving bundle %s (%s, %d classes, providers %s)%s",
                predictor.name,
                predictor.bundle.precision,
                len(predictor.classes),
                ",".join(predictor.providers),
                f", replacing {previous.predictor.name}" if previous else "",
            )
            return True

    def _load(self, target: Path, force: bool) -> Predictor | None:
        """Load and warm ``target``; None (or a raise when ``force``) when it fails."""
        key = str(target)
        try:
            predictor = self.factory(target, self.settings.predictor)
            predictor.warmup()
        except CvmError as exc:
            self._record_failure(key, exc)
            if force:
                raise
            return None
        except Exception as exc:  # noqa: BLE001 - a broken bundle must never take the server down
            self._record_failure(key, ModelLoadError(f"bundle {target.name}: {exc}"))
            if force:
                raise ModelLoadError(f"bundle {target.name}: {exc}") from None
            return None
        return predictor

    def _pointer_moved(self, loaded: Path) -> Path | None:
        """The bundle CURRENT names now, when that is no longer ``loaded`` (None: it still is)."""
        if self.settings.bundle is not None:
            return None
        try:
            now = self.target()
        except CvmError:
            return None  # a broken pointer is the next poll's business; what loaded was CURRENT
        return None if now is None or str(now) == str(loaded) else now

    def _record_failure(self, key: str | None, exc: CvmError) -> None:
        self._failed = key
        serving = self.current.predictor.name if self.current else None
        self.last_error = {"bundle": key, "error": str(exc), "at": _now(), "still_serving": serving}
        self.metrics.reloads.labels(result="failure").inc()
        log.error("refused bundle %s: %s (still serving %s)", key, exc, serving or "nothing")

    def _poll(self) -> None:
        interval = self.settings.poll_interval_s
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # the poller must outlive any one bad bundle
                log.exception("bundle poll failed")
            self.release_retired()

    def _on_retired_freed(self, _: weakref.ref[Predictor]) -> None:
        # Runs in whichever thread dropped the last reference, as soon as it did: a server that
        # only reloads through the admin endpoint (or serves one fixed bundle) trims too.
        self.release_retired()

    def release_retired(self) -> bool:
        """Once every replaced model is gone (its last request finished), hand the memory it
        freed back to the OS. Without this, glibc keeps the freed heap of each old onnxruntime
        session and the RSS of a server that reloads often grows by about a model per reload."""
        if not self._retired or any(ref() is not None for ref in self._retired):
            return False
        self._retired.clear()
        return release_free_memory()

    def start(self) -> None:
        try:
            self.check()
        except Exception:  # start without a model; readiness says so
            log.exception("initial bundle load failed")
        if self.settings.workdir is not None and self.settings.poll_interval_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="cvm-bundle-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def require(self) -> Predictor:
        loaded = self.current
        if loaded is None:
            detail = f": {self.last_error['error']}" if self.last_error else ""
            raise HTTPError(503, f"no model loaded yet{detail}")
        return loaded.predictor
