"""Issue 5, item 3: two `cvm update` at once; `cvm rollback` while the server reloads."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import trained_store

from bench.reliability.common import FAST_UPDATE, Server, real_jpegs, record, running_server, write_update_data
from bench.reliability.concurrency import SWAP_DELAY_S, rollback_during_reload, two_updates
from conftest import run_cli
from cvm_edge.checkpoints import CheckpointStore


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_update_data(tmp_path_factory.mktemp("conc-data") / "d", [2, 3], 20)


@pytest.fixture(scope="module")
def two_version_store(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path, data: Path) -> Path:
    """Checkpoints v2 and v3 with their bundles v000002 and v000003; CURRENT names v000003."""
    wd = trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("conc") / "w")
    assert run_cli("-q", "update", "--workdir", str(wd), "--data", str(data), *FAST_UPDATE) == 0
    return wd


def test_second_update_fails_fast_naming_the_holder(two_version_store: Path, data: Path, tmp_path: Path) -> None:
    wd = tmp_path / "w"
    shutil.copytree(two_version_store, wd)
    figures = two_updates(wd, data)
    assert figures["second_exit_code"] == 1, figures
    err = figures["second_error"]
    assert err.startswith("cvm: error: ") and "locked by another writer" in err, figures
    assert f"pid {figures['first_pid']}" in err and "cvm update" in err, figures
    assert figures["first_still_running_when_second_failed"], "the second update waited for the lock"
    assert figures["first_exit_code"] == 0, figures  # the held update finishes normally afterwards
    assert CheckpointStore(wd).latest() == 4
    record("two_updates", figures)


@pytest.fixture()
def slow_swap_server(two_version_store: Path, tmp_path: Path) -> Iterator[Server]:
    env = {"CVM_FAULT_AT": f"server_before_swap:sleep={SWAP_DELAY_S}"}
    args = ["--workdir", str(two_version_store), "--threads", "1", "--poll-interval", "0.2"]
    with running_server(args, tmp_path / "server.log", env) as s:
        yield s


def test_rollback_during_reload_serves_a_consistent_version(two_version_store: Path, slow_swap_server: Server) -> None:
    wd = two_version_store
    store = CheckpointStore(wd)
    figures = rollback_during_reload(
        wd,
        slow_swap_server,
        real_jpegs(8),
        lambda *args: run_cli("-q", "rollback", "--workdir", str(wd), *args),
        store.latest,
    )
    assert figures["rolled_back_to"] == "v000002" and figures["rolled_forward_to"] == "v000003", figures
    assert figures["answers_after_second_rollback"] > 0
    assert figures["answers_with_a_bundle_current_no_longer_names"] == 0, figures
    assert figures["failed_requests"] == 0
    assert figures["pointer_moved_during_load_logged"], slow_swap_server.log()[-2000:]  # the race did happen
    assert (
        figures["serving_at_end"] == "v000003"
        and figures["checkpoint_of_served_bundle"] == 3 == figures["latest_checkpoint"]
    )
    record("rollback_during_reload", figures)
