"""Pieces shared by the reliability harness: the CLI as a subprocess, a small store, real JPEGs,
a real `cvm serve` process with its RSS, a looping client and the results file."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from cvm_edge.demo import load_sample, sample_class_names, write_class_folders
from cvm_edge.fsutil import TMP_PREFIX, atomic_write_json

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO.parent / "shared" / "data" / "photos"
RESULTS_ENV = "CVM_RELIABILITY_RESULTS"
FASHION_NAMES = tuple(sample_class_names())
# the small store of the tests: 0.3M-parameter backbone at 32 px, one epoch, no head tuning
SMALL_INIT = ("--backbone", "resnet10_cifar_slim", "--pretrained", "none", "--image-size", "32", "--buffer-size", "20")
FAST_UPDATE = ("--epochs", "1", "--balance-epochs", "0", "--force", "--no-progress")


def cvm_argv(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cvm_edge.cli", *argv]


def run_cvm(*argv: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """One `cvm` command in its own process (what a shell or systemd would run)."""
    return subprocess.run(
        cvm_argv(*argv), capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )


def write_update_data(root: Path, classes: Sequence[int], per_class: int) -> Path:
    """Class folders of the embedded Fashion-MNIST sample (the first ``per_class`` images of each class)."""
    s = load_sample()
    images, labels = s["train_images"], s["train_labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    return write_class_folders(root, images[keep], labels[keep], list(FASHION_NAMES), list(classes))


def build_table(path: Path) -> Path:
    classes = path.with_suffix(".txt")
    classes.write_text("\n".join(FASHION_NAMES) + "\n")
    proc = run_cvm("-q", "embed", "build", "--classes", str(classes), "--out", str(path))
    if proc.returncode != 0:
        raise RuntimeError(f"cvm embed build failed: {proc.stderr}")
    return path


def build_store(workdir: Path, table: Path, data: Path) -> Path:
    """A small store with one update exported and published: checkpoint v2, bundle v000002."""
    for argv in (
        ("-q", "init", "--workdir", str(workdir), "--concepts", str(table), *SMALL_INIT),
        ("-q", "update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE),
    ):
        proc = run_cvm(*argv)
        if proc.returncode != 0:
            raise RuntimeError(f"cvm {argv[1]} failed: {proc.stderr[-2000:]}")
    return workdir


def real_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` real photographs as JPEG bytes: ../shared/data/photos when mounted, else held-out
    Fashion-MNIST test images (upscaled to 96 px RGB, the size of a small camera crop)."""
    if PHOTOS.is_dir():
        files = sorted(PHOTOS.glob("*.jpg"))
        if files:
            return [f.read_bytes() for f in files[:n]]
    s = load_sample()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(s["test_images"]), size=n, replace=False)
    out = []
    for i in idx:
        img = Image.fromarray(s["test_images"][i]).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def tmp_entries(workdir: Path) -> set[Path]:
    """Temp files and directories of writers under the store (what a crash leaves behind)."""
    found: set[Path] = set()
    for parent in (workdir, workdir / "checkpoints", workdir / "bundles"):
        if parent.is_dir():
            found |= {p for p in parent.iterdir() if p.name.startswith(TMP_PREFIX)}
    return found


def current_bundle_name(workdir: Path) -> str | None:
    p = workdir / "bundles" / "CURRENT"
    return p.read_text().strip() if p.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`cvm serve` in its own process on a free loopback port."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cvm_argv("serve", *args, "--port", str(self.port), "--no-access-log"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving(self) -> str | None:
        return httpx.get(self.url + "/v1/model", timeout=10).json().get("model_version")

    def wait_serving(self, name: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serving() == name:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextmanager
def running_server(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(args, log_path, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class Answer:
    at: float  # time.monotonic()
    status: int
    version: str | None
    latency_s: float


class LoopClient:
    """Posts JPEGs to /v1/classify in a loop from a thread; keeps every status and version."""

    def __init__(self, url: str, images: Sequence[bytes]) -> None:
        self.url, self.images = url, list(images)
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/classify", content=self.images[i % len(self.images)])
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                version = r.json().get("model_version") if r.status_code == 200 else None
                self.answers.append(Answer(t0, r.status_code, version, time.monotonic() - t0))
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:200]}")
                i += 1
                time.sleep(0.01)  # leave the 2-core box to the writer under test

    def since(self, t: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.at >= t]

    def __enter__(self) -> LoopClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def record(section: str, figures: dict[str, Any], path: Path | None = None) -> None:
    """Merge ``figures`` into the results file under ``section`` (atomically). Without ``path``,
    only when $CVM_RELIABILITY_RESULTS names one: a plain `make test` leaves the committed file alone."""
    target = path or (Path(os.environ[RESULTS_ENV]) if os.environ.get(RESULTS_ENV) else None)
    if target is None:
        return
    data: dict[str, Any] = {}
    if target.is_file():
        data = json.loads(target.read_text(encoding="utf-8"))
    data[section] = {**figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data["environment"] = environment()
    atomic_write_json(target, data)


def environment() -> dict[str, Any]:
    """Where the figures were measured (timings mean little without it)."""
    import platform

    import onnxruntime

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "git_commit": commit.stdout.strip() or None,
        "shared_photos": PHOTOS.is_dir(),
    }
