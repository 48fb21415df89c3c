"""Concurrency: two `cvm update` at once, and `cvm rollback` while the server is reloading.

Two updates: the first is stopped inside its lock (fault hook ``update_training:stop``), the second
must fail at once with exit 1 and a message naming the holder, then the first is resumed and must
succeed. Rollback during reload: the server runs with ``server_before_swap:sleep=S``, so each bundle
load holds a window of S seconds between "loaded" and "swapped in"; a rollback moves CURRENT, the
server starts loading that bundle, and a second rollback moves CURRENT back inside the window. The
server must never answer with a bundle CURRENT no longer names once the rollback has returned, and
must end serving CURRENT, the bundle of LATEST.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.reliability.common import FAST_UPDATE, LoopClient, Server, current_bundle_name, cvm_argv

SWAP_DELAY_S = 2.5


def two_updates(workdir: Path, data: Path, timeout: float = 300) -> dict[str, Any]:
    env = {**os.environ, "CVM_FAULT_AT": "update_training:stop"}
    first = subprocess.Popen(
        cvm_argv("-q", "update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert first.stderr is not None
        # the hook's "fault point ... reached" line: it holds the lock now (EOF: it ended instead)
        if not any("update_training reached" in line for line in iter(first.stderr.readline, "")):
            raise AssertionError(f"the first update did not stop inside its lock (exit {first.wait()})")
        t0 = time.monotonic()
        second = subprocess.run(
            cvm_argv("update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        second_s = time.monotonic() - t0
        first_running = first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=timeout)
    lines = [x for x in second.stderr.splitlines() if x.startswith("cvm: ")]
    return {
        "first_pid": first.pid,
        "second_exit_code": second.returncode,
        "second_error": lines[-1] if lines else second.stderr[-300:],
        "second_wall_s": round(second_s, 3),
        "first_still_running_when_second_failed": first_running,
        "first_exit_code": first.returncode,
        "first_error": first_err[-300:] if first.returncode else "",
    }


def rollback_during_reload(
    workdir: Path,
    server: Server,
    images: Sequence[bytes],
    rollback: Callable[..., int],
    latest: Callable[[], int],
) -> dict[str, Any]:
    """``server`` must run with ``CVM_FAULT_AT=server_before_swap:sleep=SWAP_DELAY_S`` and serve
    CURRENT; ``rollback(*args)`` runs `cvm rollback --workdir W *args`."""
    start = current_bundle_name(workdir)
    start_version = latest()
    marker = "fault point server_before_swap reached"
    with LoopClient(server.url, images) as client:
        time.sleep(0.5)
        loads = server.log().count(marker)
        if rollback() != 0:
            raise AssertionError("the first rollback failed")
        rolled_to = current_bundle_name(workdir)
        deadline = time.monotonic() + 30  # until the poller has loaded it and sits in the load -> swap window
        while server.log().count(marker) == loads:
            if time.monotonic() > deadline:
                raise AssertionError(f"the server never loaded {rolled_to}: {server.log()[-2000:]}")
            time.sleep(0.02)
        if rollback("--to", str(start_version)) != 0:
            raise AssertionError("the second rollback failed")
        t_back = time.monotonic()
        time.sleep(SWAP_DELAY_S + 1.5)
        answers = client.since(t_back)
    info = httpx.get(server.url + "/v1/model", timeout=10).json()
    stale = [a.version for a in answers if a.version != start]
    return {
        "bundle_before": start,
        "rolled_back_to": rolled_to,
        "rolled_forward_to": current_bundle_name(workdir),
        "answers_after_second_rollback": len(answers),
        "answers_with_a_bundle_current_no_longer_names": len(stale),
        "failed_requests": sum(1 for a in client.answers if a.status != 200),
        "serving_at_end": info["model_version"],
        "checkpoint_of_served_bundle": info["checkpoint_version"],
        "latest_checkpoint": latest(),
        "pointer_moved_during_load_logged": "while " in server.log() and "loaded; loading that instead" in server.log(),
    }
