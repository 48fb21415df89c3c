"""Dynamic batching (issue 19 item 6): the batcher's own logic with a stand-in model, then a real
`cvm serve` with batching on, hit by concurrent real HTTP clients that each send their own image."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_helpers import encode, trained_store, write_folders
from PIL import Image

from bench.reliability.common import Server, running_server
from deploy.batching import Batcher, BatchSettings, QueueFull
from deploy.bundle import current_bundle_dir


# ----- the batcher, with a stand-in model (our own logic) ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class Out:
    logits: np.ndarray


class RowSum:
    """Answers each row with its sum; refuses any batch that holds a negative row."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.release = release

    def run(self, x: np.ndarray) -> Out:
        if self.release is not None:
            self.release.wait(10)  # holds the runner: the requests behind it queue up
        self.batches.append(len(x))
        if (x < 0).any():
            raise ValueError("negative row")
        return Out(x.reshape(len(x), -1).sum(1, keepdims=True))


def _submit(b: Batcher, model: Any, rows: np.ndarray, out: list[Any], i: int) -> None:
    try:
        with b.admit(len(rows)) as ticket:
            out[i] = b.submit(ticket, model, rows, lambda o: o.logits[:, 0].tolist()).result(10)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        out[i] = exc


def test_a_lone_request_runs_at_once_in_its_own_thread() -> None:
    b = Batcher(BatchSettings(window_ms=60_000, max_images=8))
    model = RowSum()
    with b.admit(1) as ticket:
        fut = b.submit(ticket, model, np.ones((1, 2), np.float32), lambda o: o.logits.tolist())
    assert fut.done() and fut.result() == [[2.0]]  # nobody else was being decoded: no wait
    assert model.batches == [1] and b.queued_images == 0


def test_requests_queued_behind_a_busy_runner_run_as_one_batch_each_getting_its_rows() -> None:
    release = threading.Event()
    model = RowSum(release)
    seen: list[int] = []
    b = Batcher(BatchSettings(window_ms=5, max_images=8), observe=seen.append)
    out: list[Any] = [None] * 6
    first = threading.Thread(target=_submit, args=(b, model, np.full((1, 1), 100.0, np.float32), out, 0))
    first.start()
    while not b._free_runners == 0:  # the first request holds the only runner
        threading.Event().wait(0.001)
    rest = [
        threading.Thread(target=_submit, args=(b, model, np.full((1 + i % 2, 1), float(i), np.float32), out, i))
        for i in range(1, 6)
    ]
    for t in rest:
        t.start()
    while b.queued_images < 1 + 8:  # everyone admitted: 1 + (2 + 1 + 2 + 1 + 2) images
        threading.Event().wait(0.001)
    while len(b._queue) < 5:
        threading.Event().wait(0.001)
    release.set()
    for t in [first, *rest]:
        t.join(10)
    assert out == [[100.0], [1.0, 1.0], [2.0], [3.0, 3.0], [4.0], [5.0, 5.0]]
    assert model.batches[0] == 1 and sum(model.batches) == 9 and max(model.batches) == 8, model.batches
    assert seen == model.batches and b.queued_images == 0


def test_a_failing_request_fails_alone() -> None:
    release = threading.Event()
    model = RowSum(release)
    b = Batcher(BatchSettings(window_ms=5, max_images=8))
    out: list[Any] = [None] * 4
    rows = [np.full((1, 1), v, np.float32) for v in (1.0, 2.0, -1.0, 3.0)]
    threads = [threading.Thread(target=_submit, args=(b, model, rows[i], out, i)) for i in range(4)]
    threads[0].start()
    while not b._free_runners == 0:
        threading.Event().wait(0.001)
    for t in threads[1:]:
        t.start()
    while len(b._queue) < 3:
        threading.Event().wait(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert out[0] == [1.0] and out[1] == [2.0] and out[3] == [3.0]
    assert isinstance(out[2], ValueError)
    assert 3 in model.batches  # the batch was tried, then its requests one by one
    assert b.queued_images == 0


def test_the_queue_is_bounded_and_a_dropped_ticket_gives_its_place_back() -> None:
    b = Batcher(BatchSettings(window_ms=5, max_images=4, max_queued_images=6))
    with b.admit(4), pytest.raises(QueueFull) as err, b.admit(3):
        pass
    assert err.value.http_status == 503 and "busy" in str(err.value)
    assert b.queued_images == 0  # neither ticket was submitted (a failed decode): both gone
    with b.admit(6):
        assert b.queued_images == 6


def test_requests_for_different_models_never_share_a_batch() -> None:
    release = threading.Event()
    old, new = RowSum(release), RowSum()
    b = Batcher(BatchSettings(window_ms=5, max_images=8))
    out: list[Any] = [None] * 3
    first = threading.Thread(target=_submit, args=(b, old, np.ones((1, 1), np.float32), out, 0))
    first.start()
    while not b._free_runners == 0:
        threading.Event().wait(0.001)
    others = [
        threading.Thread(target=_submit, args=(b, m, np.full((1, 1), 2.0, np.float32), out, i))
        for i, m in ((1, new), (2, old))
    ]
    for t in others:
        t.start()
    while len(b._queue) < 2:
        threading.Event().wait(0.001)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert out == [[1.0], [2.0], [2.0]]
    assert new.batches == [1] and old.batches == [1, 1]


def test_settings_are_checked() -> None:
    for bad in ({"window_ms": -1}, {"max_images": 0}, {"runners": 0}, {"max_images": 8, "max_queued_images": 4}):
        with pytest.raises(ValueError):
            BatchSettings(**bad)  # type: ignore[arg-type]
    assert not BatchSettings(window_ms=0).enabled


# ----- a real server, concurrent real clients ------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("batching") / "w")


@pytest.fixture(scope="module")
def server(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("batching-log") / "server.log"
    args = ["--workdir", str(workdir), "--threads", "1", "--worker-threads", "8", "--batch-window-ms", "50"]
    with running_server([*args, "--batch-max-images", "8", "--batch-runners", "1"], log) as s:
        yield s


def _images(tmp: Path) -> list[bytes]:
    """Eight different real images of the two learned classes (PNG files of the demo sample)."""
    root = write_folders(tmp, [0, 1], 4)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 8
    return [encode(Image.open(f).convert("RGB"), "JPEG", quality=95) for f in files]


def _batch_metric(c: httpx.Client) -> tuple[float, float, float]:
    """(runs, images, runs of one image) of the cvm_batch_images histogram."""
    found = {"count": 0.0, "sum": 0.0, "one": 0.0}
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("cvm_batch_images_count "):
            found["count"] = float(line.split()[-1])
        elif line.startswith("cvm_batch_images_sum "):
            found["sum"] = float(line.split()[-1])
        elif line.startswith('cvm_batch_images_bucket{le="1.0"} '):
            found["one"] = float(line.split()[-1])
    return found["count"], found["sum"], found["one"]


def test_concurrent_clients_each_get_their_own_images_answer_from_shared_batches(
    server: Server, workdir: Path, tmp_path: Path
) -> None:
    from deploy.predictor import Predictor, PredictorOptions

    images = _images(tmp_path)
    bundle = current_bundle_dir(workdir)
    assert bundle is not None
    predictor = Predictor(bundle, PredictorOptions(intra_op_threads=1))
    expected = [predictor.classify([im], 2)[0] for im in images]
    assert len({tuple(round(p["score"], 4) for p in e) for e in expected}) > 4  # the images differ
    broken = images[0][: len(images[0]) // 3]  # a truncated JPEG among them
    answers: dict[int, list[Any]] = {i: [] for i in range(len(images) + 1)}
    start = threading.Barrier(len(images) + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            start.wait()
            for _ in range(6):
                r = c.post("/v1/classify?top_k=2", content=broken if i == len(images) else images[i])
                answers[i].append((r.status_code, r.json()))

    with httpx.Client(base_url=server.url, timeout=60) as c:
        runs0, images0, _ = _batch_metric(c)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images) + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        runs, total, ones = _batch_metric(c)
    for i, want in enumerate(expected):
        for status, body in answers[i]:
            assert status == 200, body
            got = body["predictions"]
            assert [p["label"] for p in got] == [p["label"] for p in want], (i, got, want)
            assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-4), (i, got, want)
    for status, body in answers[len(images)]:  # the broken image: its own error, nobody else's
        assert 400 <= status < 500 and set(body) == {"error"}, body
    assert total - images0 == 6 * len(images)  # every good image went through the batcher once
    assert runs - runs0 < total - images0, "no batch of more than one image formed"
    assert ones < runs, "every run held one image"
