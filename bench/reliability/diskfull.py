"""Disk full: `cvm update` on a store whose filesystem runs out of space.

Preferred: a real size-limited filesystem, a tmpfs mounted in a private mount namespace
(``unshare --user --map-root-user --mount``: no root needed where user namespaces are allowed).
The store is copied onto it and a filler file leaves exactly as much space free as a scenario
needs: (a) too little for the checkpoint, (b) room for the checkpoint but not for the export.
Where no namespace can be made, the fault hook injects ENOSPC at the same steps
(``CVM_FAULT_AT=checkpoint_files_written:enospc`` / ``bundle_files_written:enospc``).

Each scenario must end with exit code 1, a one-line error that says the disk is full, the
previous checkpoint and bundle current and loadable, no temp entries left, `cvm status` working,
and, once space is freed, the next update succeeding.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.reliability.common import FAST_UPDATE, current_bundle_name, tmp_entries

MiB = 1 << 20


def cli_in_process(*argv: str) -> tuple[int, str]:
    """`cvm ARGV` in this process; (exit code, stderr)."""
    from cvm_edge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_intact(workdir: Path, latest: int, bundle: str | None) -> dict[str, Any]:
    from cvm_edge.checkpoints import CheckpointStore
    from deploy.bundle import current_bundle_dir
    from deploy.predictor import Predictor

    store = CheckpointStore(workdir)
    ok = store.latest() == latest and current_bundle_name(workdir) == bundle
    store.load()  # complete and readable
    cur = current_bundle_dir(workdir)
    if cur is not None:
        Predictor(cur)  # sha256 verified, loads
    status, _ = cli_in_process("-q", "status", "--workdir", str(workdir))
    return {"previous_version_current": ok, "status_exit_code": status, "temp_entries_left": len(tmp_entries(workdir))}


@contextlib.contextmanager
def leave_free(mount: Path, free_bytes: int) -> Iterator[int]:
    """Fill ``mount`` until ``free_bytes`` are left; yields the free space actually left."""
    filler = mount / "filler"
    room = shutil.disk_usage(mount).free - free_bytes
    with open(filler, "wb") as fh:
        chunk = b"\0" * MiB
        while room > 0:
            fh.write(chunk[: min(room, MiB)])
            room -= MiB
    try:
        yield shutil.disk_usage(mount).free
    finally:
        filler.unlink()


def scenario(workdir: Path, data: Path, name: str) -> dict[str, Any]:
    from cvm_edge.checkpoints import CheckpointStore

    latest = CheckpointStore(workdir).latest()
    bundle = current_bundle_name(workdir)
    code, err = cli_in_process("-q", "update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE)
    lines = [line for line in err.splitlines() if line.strip()]
    out: dict[str, Any] = {
        "scenario": name,
        "exit_code": code,
        "error": lines[-1] if lines else "",
        "stderr_lines": len(lines),
    }
    if name == "export":  # the checkpoint was written, the bundle was not: the server keeps the old one
        out.update(check_intact(workdir, latest + 1, bundle))
    else:
        out.update(check_intact(workdir, latest, bundle))
    return out


def run_on_tmpfs(src: Path, data: Path, ckpt_bytes: int) -> dict[str, Any]:
    """Inside the private mount namespace: mount, copy, run the scenarios, recover."""
    mount = Path(tempfile.mkdtemp(prefix="cvm-diskfull-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={64 * MiB}", "tmpfs", str(mount)], check=True)
    try:
        workdir = mount / "w"
        shutil.copytree(src, workdir)
        results = []
        with leave_free(mount, MiB) as free:
            results.append({**scenario(workdir, data, "checkpoint"), "free_bytes": free})
        with leave_free(mount, ckpt_bytes + MiB) as free:
            results.append({**scenario(workdir, data, "export"), "free_bytes": free})
        code, err = cli_in_process("-q", "update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE)
        return {
            "method": "tmpfs (64 MiB) in a private mount namespace, filled to leave a given free space",
            "scenarios": results,
            "recovery_update_exit_code": code,
            "recovery_stderr": err[-500:],
            "temp_entries_after_recovery": len(tmp_entries(workdir)),
        }
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def run_disk_full(workdir: Path, data: Path) -> dict[str, Any]:
    """The real-filesystem run, in a child process inside a private mount namespace."""
    from cvm_edge.checkpoints import CheckpointStore

    store = CheckpointStore(workdir)
    ckpt_bytes = dir_bytes(store.path(store.latest()))
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            sys.executable,
            "-m",
            "bench.reliability.diskfull",
            "--src",
            str(workdir),
            "--data",
            str(data),
            "--checkpoint-bytes",
            str(ckpt_bytes),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[2],
    )
    if proc.returncode != 0:
        raise RuntimeError(f"disk-full run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_injected(workdir: Path, data: Path) -> dict[str, Any]:
    """ENOSPC injected by the fault hook at the checkpoint write and at the bundle write."""
    results = []
    for point, name in (("checkpoint_files_written", "checkpoint"), ("bundle_files_written", "export")):
        os.environ["CVM_FAULT_AT"] = f"{point}:enospc"
        try:
            results.append({**scenario(workdir, data, name), "fault": f"{point}:enospc"})
        finally:
            del os.environ["CVM_FAULT_AT"]
    code, _ = cli_in_process("-q", "update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE)
    return {"method": "ENOSPC injected by CVM_FAULT_AT", "scenarios": results, "recovery_update_exit_code": code}


def main() -> None:
    ap = argparse.ArgumentParser(description="disk-full scenarios inside a private mount namespace (internal)")
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--checkpoint-bytes", type=int, required=True)
    args = ap.parse_args()
    print(json.dumps(run_on_tmpfs(args.src, args.data, args.checkpoint_bytes)))


if __name__ == "__main__":
    main()
