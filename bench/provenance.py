"""Provenance of a benchmark result: git commit, machine, library versions, date, command.

One helper for every result JSON under ``bench/results``::

    from bench.provenance import provenance
    result = {"benchmark": "inference", **provenance("python -m bench.inference", sys.argv[1:]), ...}

Library versions are read from the installed distributions (``importlib.metadata``), so asking for
them imports nothing heavy; a library that is not installed is reported as ``None``. The commit is
``CVM_BENCH_COMMIT`` when git is unavailable (a copied tree on a GPU host), with ``+dirty`` when the
working tree has uncommitted changes.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# distribution names of the libraries a result may depend on (reported when installed)
LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
    "fastapi",
    "uvicorn",
    "starlette",
)


def git_commit(repo: Path = REPO) -> str:
    """``$CVM_BENCH_COMMIT`` when set (a copied tree on a GPU machine may carry stale git metadata),
    else ``HEAD`` of ``repo``, plus ``+dirty`` when the tree has uncommitted changes."""
    if os.environ.get("CVM_BENCH_COMMIT"):
        return os.environ["CVM_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("CVM_BENCH_COMMIT", "unknown")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Host, OS, CPU model and core count (usable cores where the OS can say), load average."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def versions(libraries: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Python and the installed version of each library (``None`` when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in libraries:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def command_line(prefix: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run: ``prefix`` and the arguments, shell-quoted."""
    return " ".join([prefix, *(shlex.quote(a) for a in argv)])


def provenance(prefix: str, argv: Sequence[str], libraries: Iterable[str] = LIBRARIES) -> dict[str, Any]:
    """The provenance fields every result JSON carries: command, git_commit, date, machine, versions."""
    return {
        "command": command_line(prefix, argv),
        "git_commit": git_commit(),
        "date": utc_now(),
        "machine": machine(),
        "versions": versions(libraries),
    }
