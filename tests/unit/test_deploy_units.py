"""firmware_notes/systemd: the units parse, and `cvm inbox` (what cvm-update.service runs) does what
power-loss.md says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAKE_CVM

UNITS = Path(__file__).resolve().parents[2] / "firmware_notes" / "systemd"
REPO = UNITS.parents[1]


def _run(tmp: Path) -> subprocess.CompletedProcess[str]:
    """`cvm inbox` as cvm-update.service runs it (flags after `--` go to every update)."""
    env = {**os.environ, "CALLS": str(tmp / "calls"), "PYTHONPATH": str(REPO)}
    argv = ["inbox", "--workdir", str(tmp / "store"), "--spool", str(tmp / "spool"), "--cvm", str(tmp / "cvm")]
    return subprocess.run(
        [sys.executable, "-m", "cvm_edge.cli", *argv, "--", "--epochs", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _folder(path: Path, bad: bool = False) -> Path:
    (path / "bag").mkdir(parents=True)
    (path / "bag" / "0.png").write_bytes(b"png")
    if bad:
        (path / "BAD").write_text("")
    return path


def _jobs(spool: Path, queue: str) -> list[str]:
    """The upload names of the jobs in ``queue`` (each job folder records its upload's name)."""
    return sorted((spool / queue / j / "name").read_text().strip() for j in os.listdir(spool / queue))


def test_cvm_inbox_learns_each_folder_once_and_recovers_interrupted_ones(tmp_path: Path) -> None:
    if shutil.which("sh") is None:
        pytest.skip("no POSIX shell")
    (tmp_path / "cvm").write_text(FAKE_CVM)
    (tmp_path / "cvm").chmod(0o755)
    spool, store = tmp_path / "spool", tmp_path / "store"
    _folder(spool / "inbox" / "first")
    _folder(spool / "inbox" / "bad-second", bad=True)
    (spool / "inbox" / "stray.txt").write_text("not a folder")
    _folder(spool / "incoming" / "half-copied")
    # left by the shell script of earlier releases, interrupted before publishing (LATEST unchanged): learned again
    again = _folder(spool / "processing" / "cut-during-training")
    (again / ".cvm-latest-before").write_text("none\n")
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _jobs(spool, "done") == ["cut-during-training", "first"]
    assert _jobs(spool, "failed") == ["bad-second", "stray.txt"]
    assert list((spool / "inbox").iterdir()) == [] and list((spool / "processing").iterdir()) == []
    assert (spool / "incoming" / "half-copied").is_dir()  # never touched
    logs = "".join((spool / "failed" / j / "cvm-update.log").read_text() for j in os.listdir(spool / "failed"))
    assert "not in the concept table" in logs and "not a folder" in logs
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 3 and all(
        c.startswith("update --workdir") and c.endswith("--no-progress --epochs 3") for c in calls
    )

    # interrupted after the checkpoint was published but before the bundle: export only, no second update
    cut = _folder(spool / "processing" / "cut-during-export")
    (cut / ".cvm-latest-before").write_text((store / "checkpoints" / "LATEST").read_text())
    (store / "checkpoints" / "LATEST").write_text("v000009\n")
    # and one where both were published: nothing to do
    both = _folder(spool / "processing" / "cut-after-publish")
    (both / ".cvm-latest-before").write_text("v000001\n")
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()[3:]
    assert calls == [f"export --workdir {store}"]
    assert (store / "bundles" / "CURRENT").read_text().strip() == "v000009"
    assert _jobs(spool, "done") == ["cut-after-publish", "cut-during-export", "cut-during-training", "first"]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in UNITS.glob("cvm-*.*"):
        if unit.suffix in (".service", ".path", ".timer"):
            text = unit.read_text()
            # the binaries live under /opt/cvm on a device; point them at something that exists here
            text = text.replace("/opt/cvm/venv/bin/cvm", "/bin/true")
            (tmp_path / unit.name).write_text(text)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cvm-serve.service", "cvm-update.path", "cvm-update.service", "cvm-update.timer"]
    proc = subprocess.run(
        [tool, "verify", *[str(tmp_path / n) for n in names]], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert problems == [], problems
