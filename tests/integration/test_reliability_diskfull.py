"""Issue 5, item 2: `cvm update` on a full disk: exit 1, one clear line, the previous version intact.

The real run mounts a small tmpfs in a private mount namespace (no root needed where user
namespaces are allowed) and skips where that is impossible; the injected run (fault hook ENOSPC at
the same steps) runs everywhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.reliability.common import FAST_UPDATE, SMALL_INIT, record, write_update_data
from bench.reliability.diskfull import namespaces_available, run_disk_full, run_injected
from conftest import run_cli


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("diskfull")
    data = write_update_data(base / "data", [0, 1], 20)
    wd = base / "w"
    assert run_cli("-q", "init", "--workdir", str(wd), "--concepts", str(fashion_table), *SMALL_INIT) == 0
    assert run_cli("-q", "update", "--workdir", str(wd), "--data", str(data), *FAST_UPDATE) == 0
    return wd, data


def _check(figures: dict) -> None:
    by_name = {s["scenario"]: s for s in figures["scenarios"]}
    assert set(by_name) == {"checkpoint", "export"}
    for s in figures["scenarios"]:
        assert s["exit_code"] == 1, s
        assert s["error"].startswith("cvm: error: ") and "Traceback" not in s["error"], s
        assert "no space left" in s["error"].lower(), s
        assert s["previous_version_current"] and s["status_exit_code"] == 0 and s["temp_entries_left"] == 0, s
    assert "stays current" in by_name["checkpoint"]["error"]
    assert "no bundle was published" in by_name["export"]["error"]
    assert figures["recovery_update_exit_code"] == 0


def test_full_disk_on_a_real_small_filesystem(base_store: tuple[Path, Path], tmp_path: Path) -> None:
    if not namespaces_available():
        pytest.skip("no private mount namespace here (unshare --user --mount refused); the injected test covers it")
    figures = run_disk_full(*base_store)
    _check(figures)
    assert figures["temp_entries_after_recovery"] == 0
    record("disk_full_tmpfs", figures)


def test_full_disk_injected(base_store: tuple[Path, Path], tmp_path: Path) -> None:
    wd = tmp_path / "w"
    shutil.copytree(base_store[0], wd)
    figures = run_injected(wd, base_store[1])
    _check(figures)
    record("disk_full_injected", figures)
