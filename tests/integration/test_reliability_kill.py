"""Issue 5, item 1: `cvm update` (with export and publish) killed with SIGKILL at every fault point
and at seeded random times during training and export, with a real server answering all along."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.reliability.common import SMALL_INIT, Server, real_jpegs, record, running_server, write_update_data
from bench.reliability.kill import Timeline, default_plan, measure_timeline, run_campaign
from conftest import run_cli

SEED = int(os.environ.get("CVM_RELIABILITY_SEED", "5"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> tuple[Path, Path, Timeline]:
    """A fresh small store whose first update (uninterrupted, timed phase by phase) published v000002."""
    base = tmp_path_factory.mktemp("kill")
    data = write_update_data(base / "data", [0, 1], 20)
    assert run_cli("-q", "init", "--workdir", str(base / "w"), "--concepts", str(fashion_table), *SMALL_INIT) == 0
    return base / "w", data, measure_timeline(base / "w", data)


@pytest.fixture(scope="module")
def server(store: tuple[Path, Path, Timeline], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("kill-log") / "server.log"
    with running_server(["--workdir", str(store[0]), "--threads", "1", "--poll-interval", "0.2"], log) as s:
        yield s


def _status(workdir: Path) -> int:
    return run_cli("-q", "status", "--workdir", str(workdir))


def test_kill_minus_9_anywhere_in_an_update_loses_nothing(store: tuple[Path, Path, Timeline], server: Server) -> None:
    workdir, data, timeline = store
    lines: list[str] = []
    figures = run_campaign(workdir, data, server, real_jpegs(16), default_plan(SEED), _status, timeline, lines.append)
    print("\n".join(lines))
    assert figures["n_kills"] >= 10, lines
    assert {"training", "checkpoint write", "bundle export", "publish"} <= set(figures["phases_hit"]), lines
    assert figures["final_update"]["exit_code"] == 0 and figures["temp_entries_after_final_update"] == 0
    cleaned = [k["tmp_cleaned_by_next_start"] for k in figures["kills"] if k["tmp_left"]]
    assert cleaned and all(c is not False for c in cleaned), figures["kills"]
    assert figures["server_failed_requests"] == 0 and figures["server_requests"] > 0
    assert server.alive()
    record("kill", {"seed": SEED, **figures})
