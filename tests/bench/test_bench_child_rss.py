"""bench.child_rss: the peak RSS of the command itself, not of the process that started it."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.child_rss import MARK


def test_the_launcher_reports_the_commands_own_peak_and_passes_its_exit_code_on() -> None:
    # 150 MB touched page by page, then exit 3; this test process (torch imported) is far larger than
    # the 400 MB bound, so a figure inherited from it would fail the bound
    import torch  # noqa: F401 - makes the parent's resident size large, as the benchmark harness's

    code = "import sys; b = bytearray(150 << 20); b[::4096] = bytes(len(b[::4096])); sys.exit(3)"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.child_rss", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 3
    got = json.loads(proc.stderr.split(MARK, 1)[1].splitlines()[0])
    assert got["rc"] == 3
    assert 150 * 1024 <= got["peak_rss_kb"] < 400 * 1024, got


def test_the_launcher_without_a_command_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.child_rss"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
