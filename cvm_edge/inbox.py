"""``cvm inbox``: learn every data folder waiting in a spool inbox, one ``cvm update`` each, oldest first.

Replaces the shell script the systemd units used to run. An uploader controls the names and the
contents of what it puts in the inbox, so nothing here trusts either:

- an entry is moved, by one ``rename`` that never follows a link, into a job folder whose name this
  code chooses (``processing/<time>-<n>-<slug>/data``); any name works, newlines and non-UTF-8
  bytes included, and is only ever printed escaped;
- everything this code writes (the log, the LATEST seen before) lives in the job folder, beside the
  upload and never inside it, opened with ``O_NOFOLLOW | O_EXCL``: a link in an upload named like a
  log file cannot redirect a write into the store;
- an entry that is a link or not a folder is refused without being followed; a failure of one job
  (refused data, a crash, an unmovable entry) is recorded and the next entry is learned.

Spool layout (``--spool``)::

    incoming/NAME   being copied by the uploader (never looked at)
    inbox/NAME      complete, waiting (moved here in one rename by the uploader)
    processing/JOB  being learned: data/ (the upload), latest-before, cvm-update.log, name
    done/JOB        learned and published      failed/JOB   refused; see JOB/cvm-update.log

A job still in ``processing/`` when this starts was interrupted (power cut, kill). If LATEST moved
since, the checkpoint was published and at most the bundle is missing: ``cvm export`` alone.
Otherwise nothing was published (updates are atomic) and the folder is learned again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import errno
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cvm_edge.display import printable
from cvm_edge.errors import UsageError
from cvm_edge.fsutil import FileLock, read_pointer, read_regular
from cvm_edge.workdir import layout

log = logging.getLogger(__name__)

QUEUES = ("incoming", "inbox", "processing", "done", "failed")
DATA, BEFORE, LOG, NAME = "data", "latest-before", "cvm-update.log", "name"
LEGACY_BEFORE = ".cvm-latest-before"  # what the shell script kept inside the upload
RESERVED_FLAGS = ("--workdir", "--data")
JOB_RE = re.compile(r"^\d{8}T\d{6}Z-\d{4}-")


@dataclasses.dataclass(frozen=True)
class InboxConfig:
    workdir: Path
    spool: Path
    update_args: tuple[str, ...] = ()
    # the command that runs `update` and `export` (default: this interpreter's cvm)
    cvm: tuple[str, ...] = (sys.executable, "-m", "cvm_edge.cli")

    def __post_init__(self) -> None:
        for arg in self.update_args:
            if arg.split("=", 1)[0] in RESERVED_FLAGS:
                raise UsageError(f"{arg.split('=', 1)[0]} is set by cvm inbox itself; leave it out of the update flags")


@dataclasses.dataclass(frozen=True)
class InboxReport:
    done: tuple[str, ...]  # job names
    failed: tuple[str, ...]

    def summary(self) -> str:
        return f"cvm inbox: {len(self.done)} folder(s) learned, {len(self.failed)} refused"


def _say(text: str) -> None:
    print(f"cvm-inbox: {printable(text)}", flush=True)


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _new_job(processing: Path, original: str) -> Path:
    """A fresh job folder with a name of our choosing (unique, one safe path component)."""
    from cvm_edge.concepts import slugify  # numpy: imported when a job starts, not by `cvm --help`

    slug = slugify(original)[:40].strip("-") or "folder"
    for n in range(1, 10_000):
        job = processing / f"{_stamp()}-{n:04d}-{slug}"
        try:
            job.mkdir()
        except FileExistsError:
            continue
        return job
    raise OSError(errno.EEXIST, "no free job name", str(processing))


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (never an existing file, never through a link) and write ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(text)


def _append_log(job: Path, text: str) -> None:
    fd = os.open(job / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(text)


def _is_job(path: Path) -> bool:
    """A job folder this code made (not an upload the shell script left in processing/)."""
    return bool(JOB_RE.match(path.name)) and (path / BEFORE).is_file() and (path / NAME).is_file()


def _latest(workdir: Path) -> str:
    try:
        return read_pointer(layout(workdir).latest) or "none"
    except Exception:  # noqa: BLE001 - an unreadable pointer reads as unknown: the job is learned again
        return "unknown"


def _current(workdir: Path) -> str:
    try:
        return read_pointer(layout(workdir).current) or "none"
    except Exception:  # noqa: BLE001
        return "none"


def _run_cvm(cfg: InboxConfig, job: Path, argv: Sequence[str]) -> int:
    """Run one cvm command with its output appended to the job's log (opened without following
    links); the log is echoed, escaped, to this process's output."""
    fd = os.open(job / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "the job log is not a regular file", str(job / LOG))
        proc = subprocess.run(
            [*cfg.cvm, *argv], stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, check=False
        )
    finally:
        os.close(fd)
    text = read_regular(job / LOG, 64 << 20, follow_symlinks=False).decode("utf-8", errors="replace")
    for line in text.splitlines()[-50:]:
        _say(f"  {line}")
    return proc.returncode


def _finish(cfg: InboxConfig, job: Path, queue: str, report: dict[str, list[str]]) -> None:
    dest = cfg.spool / queue / job.name
    n = 1
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = cfg.spool / queue / f"{job.name}.{n}"
    os.rename(job, dest)
    report[queue].append(dest.name)
    _say(f"{_original(dest)} -> {queue}/{dest.name}")


def _original(job: Path) -> str:
    try:
        return read_regular(job / NAME, 4096, follow_symlinks=False).decode("utf-8", errors="replace").strip()
    except OSError:
        return job.name


def _learn(cfg: InboxConfig, job: Path, report: dict[str, list[str]]) -> None:
    data = job / DATA
    try:
        mode = os.lstat(data).st_mode
    except FileNotFoundError:
        mode = 0
    if not stat.S_ISDIR(mode):  # lstat: a link is refused whatever it points at, and never followed
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "missing" if mode == 0 else "not a folder"
        _append_log(job, f"cvm-inbox: the upload is {kind}; only folders are learned\n")
        _say(f"{_original(job)} is {kind}; refused")
        _finish(cfg, job, "failed", report)
        return
    argv = ["update", "--workdir", str(cfg.workdir), "--data", str(data), "--no-progress", *cfg.update_args]
    code = _run_cvm(cfg, job, argv)
    if code != 0:
        _say(f"cvm update failed (exit {code}) on {_original(job)}")
    _finish(cfg, job, "done" if code == 0 else "failed", report)


def _recover(cfg: InboxConfig, job: Path, report: dict[str, list[str]]) -> None:
    """A job an interrupted run left in processing/ (see the module docstring)."""
    if not _is_job(job):
        # left by the shell script: the upload itself, its LATEST inside it; wrap it as a job
        legacy, job = job, _new_job(cfg.spool / "processing", job.name)
        try:
            before = read_regular(legacy / LEGACY_BEFORE, 4096, follow_symlinks=False).decode().strip()
        except (OSError, UnicodeDecodeError):
            before = "unknown"
        _write_new(job / NAME, legacy.name + "\n")
        _write_new(job / BEFORE, before + "\n")
        os.rename(legacy, job / DATA)
    try:
        before = read_regular(job / BEFORE, 4096, follow_symlinks=False).decode().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        before = "unknown"
    now = _latest(cfg.workdir)
    if before in (now, "unknown"):
        _say(f"{_original(job)} was interrupted before publishing; learning it again")
        _learn(cfg, job, report)
    elif _current(cfg.workdir).startswith(now):
        _finish(cfg, job, "done", report)  # checkpoint and bundle were both published
    else:
        _say(f"{_original(job)}: checkpoint {now} published, bundle missing; exporting")
        code = _run_cvm(cfg, job, ["export", "--workdir", str(cfg.workdir)])
        _finish(cfg, job, "done" if code == 0 else "failed", report)


def _waiting(inbox: Path, tried: set[str]) -> list[str]:
    """Inbox entries not tried yet in this run, oldest first (by their own mtime, links not followed)."""
    entries = []
    for entry in os.scandir(inbox):
        if entry.name in tried:
            continue
        try:
            entries.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        except OSError:
            continue
    return [name for _, name in sorted(entries)]


def run_inbox(cfg: InboxConfig) -> InboxReport:
    """Recover interrupted jobs, then learn every inbox entry; never stops at one bad entry."""
    for queue in QUEUES:
        (cfg.spool / queue).mkdir(parents=True, exist_ok=True)
    report: dict[str, list[str]] = {"done": [], "failed": []}
    with FileLock(cfg.spool / ".inbox.lock", "cvm inbox"):
        for entry in sorted(os.listdir(cfg.spool / "processing")):
            job = cfg.spool / "processing" / entry
            try:
                if os.path.islink(job) or not job.is_dir():
                    job = _wrap(cfg, entry, cfg.spool / "processing")
                    _learn(cfg, job, report)
                else:
                    _recover(cfg, job, report)
            except Exception as exc:  # noqa: BLE001 - one broken job must not block the rest
                _say(f"{entry}: could not be handled ({exc}); left in processing/")
        tried: set[str] = set()
        while batch := _waiting(cfg.spool / "inbox", tried):
            for name in batch:
                tried.add(name)  # tried once per run, even when it cannot be moved
                try:
                    job = _wrap(cfg, name, cfg.spool / "inbox")
                except OSError as exc:
                    _say(f"{name} cannot be moved out of the inbox ({exc.strerror or exc}); skipped")
                    continue
                try:
                    _learn(cfg, job, report)
                except Exception as exc:  # noqa: BLE001 - record it and go on with the next folder
                    _say(f"{name}: {exc}")
                    if job.exists():
                        _finish(cfg, job, "failed", report)
    out = InboxReport(tuple(report["done"]), tuple(report["failed"]))
    _say(out.summary())
    return out


def _wrap(cfg: InboxConfig, name: str, parent: Path) -> Path:
    """Move ``parent/name`` (the entry itself, a link is not followed) into a new job as ``data``."""
    job = _new_job(cfg.spool / "processing", name)
    _write_new(job / NAME, name + "\n")
    _write_new(job / BEFORE, _latest(cfg.workdir) + "\n")
    try:
        os.rename(parent / name, job / DATA)
    except OSError:
        for f in (NAME, BEFORE):
            (job / f).unlink(missing_ok=True)
        job.rmdir()
        raise
    return job


# ----- command line --------------------------------------------------------------------------
def cmd_inbox(args: argparse.Namespace) -> int:
    extra = list(args.update_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cvm = tuple(args.cvm.split()) if args.cvm else InboxConfig.cvm
    cfg = InboxConfig(workdir=args.workdir, spool=args.spool, update_args=tuple(extra), cvm=cvm)
    run_inbox(cfg)
    return 0


def add_inbox_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inbox",
        help="learn every data folder waiting in a spool inbox (one `cvm update` each; what the systemd units run)",
        description="Learn every folder in SPOOL/inbox, oldest first, with `cvm update --no-progress`; move each to "
        "SPOOL/done or SPOOL/failed with its log. Flags after `--` go to every `cvm update`.",
    )
    p.add_argument("--workdir", type=Path, required=True, help="the store")
    p.add_argument("--spool", type=Path, required=True, help="the spool (incoming/, inbox/, processing/, done/, ...)")
    p.add_argument("--cvm", default=None, help=argparse.SUPPRESS)  # tests: a stand-in command
    p.add_argument("update_args", nargs=argparse.REMAINDER, help="-- then flags for cvm update (e.g. -- --epochs 5)")
    p.set_defaults(func=cmd_inbox)
