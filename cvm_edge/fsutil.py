"""Crash-safe file primitives: atomic writes, directory publishing, pointer files, a writer lock.

Every artefact cvm-edge writes goes through here, so a power cut at any instant leaves either
the old or the new version on disk, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvm_edge.errors import LockHeldError, StoreError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
FAULT_ENV = "CVM_FAULT_AT"
FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk was full


# Upper bounds for files read whole. An image: a 40 MP frame (the decoder's pixel limit) even stored raw
# is 120 MB. A bundle's model.onnx: protobuf cannot hold more than 2 GiB. Checkpoint files are hashed in
# chunks, never held whole, so their bound only stops a sparse or runaway file from being read forever.
MAX_IMAGE_BYTES = 128 << 20
MAX_MODEL_BYTES = 2 << 30
MAX_SMALL_FILE_BYTES = 64 << 20  # meta.json, manifest.json, labels.csv, pointer files
MAX_STORE_FILE_BYTES = 64 << 30
_CHUNK = 1 << 20


class InjectedFault(RuntimeError):
    """Raised at a named fault point when ``CVM_FAULT_AT`` names it (crash-safety tests)."""


def fault_point(name: str) -> None:
    """Test hook: misbehave here when the environment asks for it (see RELIABILITY.md).

    ``CVM_FAULT_AT=<name>[:<mode>]``, where mode is

    - (none): raise :class:`InjectedFault`;
    - ``exit``: ``os._exit(137)`` on the spot, which is what a power cut looks like to the disk;
    - ``stop``: say so on stderr and ``SIGSTOP`` this process, so a harness can ``kill -9`` it at
      exactly this point (a ``SIGCONT`` lets it go on);
    - ``sleep=<s>``: say so on stderr and wait ``s`` seconds (widens a race window);
    - ``enospc``: raise ``OSError(ENOSPC)``, a full disk where no small filesystem can be mounted.
    """
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted:
        return
    point, _, mode = wanted.partition(":")
    if point != name:
        return
    if mode == "exit":
        os._exit(137)
    if mode in ("stop",) or mode.startswith("sleep="):
        import sys

        # the harness waits for this line to know the process is exactly here
        print(f"cvm: fault point {name} reached (pid {os.getpid()}); {mode}", file=sys.stderr, flush=True)
    if mode == "stop":
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if mode.startswith("sleep="):
        time.sleep(float(mode.removeprefix("sleep=")))
        return
    if mode == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")
    raise InjectedFault(f"fault injected at {name}")


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file) itself, not only the file data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (before it is renamed into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def make_tmp_dir(parent: Path, name: str) -> Path:
    """A fresh temp directory inside ``parent`` that :func:`clean_stale_tmp` recognises."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{name}.{os.getpid()}.{time.monotonic_ns()}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp directory to its final name, durably."""
    fsync_tree(tmp)
    fault_point("before_rename")
    # the same step, told apart by store (checkpoints_before_rename, bundles_before_rename)
    fault_point(f"{final.parent.name}_before_rename")
    if final.exists():
        raise StoreError(f"refusing to overwrite existing {final}")
    os.rename(tmp, final)
    fsync_dir(final.parent)


def remove_tmp_dir(tmp: Path) -> None:
    """Remove a writer's own temp directory after a failed write (frees the space it took)."""
    shutil.rmtree(tmp, ignore_errors=True)


def write_error(what: str, where: Path, exc: BaseException) -> StoreError:
    """One line for a failed write that names a full disk when that is the cause.

    torch and numpy report a full disk as a bare RuntimeError/ValueError without an errno, so the
    free space left on the filesystem (measured before the caller frees its temp files) decides."""
    try:
        free: int | None = shutil.disk_usage(where).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < FULL_BYTES)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if full:
        detail = f"no space left on the device ({free if free is not None else '?'} bytes free; {detail})"
    return StoreError(f"cannot write {what} in {where}: {detail}")


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A temp directory inside ``parent`` that is the process's default temp dir while it is open.

    Writers (ONNX export, quantisation) put their scratch files here rather than in /tmp: what a
    killed writer leaves behind is removed by the next writer's :func:`clean_stale_tmp` instead
    of piling up in /tmp, and a full store disk shows up as a failed write of this command."""
    tmp = make_tmp_dir(parent, "scratch")
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = before
        remove_tmp_dir(tmp)


def clean_stale_tmp(parent: Path) -> list[Path]:
    """Remove temp files/directories left by a crashed writer. Call only while holding the lock."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
            log.info("removed stale temp entry %s", entry)
    return removed


class UnsafeFileError(OSError):
    """A path that is not a plain, bounded regular file: a FIFO, a device, a directory, a file over
    its size limit, or (when links are refused) a symbolic link."""


@contextlib.contextmanager
def open_regular(path: Path, max_bytes: int, follow_symlinks: bool = True) -> Iterator[tuple[int, int]]:
    """Open ``path`` read-only as a regular file of at most ``max_bytes``; yields (fd, size).

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer, and the
    fstat of the opened descriptor (not of the name, which may change) refuses FIFOs, devices
    (``/dev/zero``) and anything too large before one byte is read. ``follow_symlinks=False``
    adds ``O_NOFOLLOW``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafeFileError(errno.ELOOP, "is a symbolic link; refused", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(errno.EINVAL, f"is not a regular file ({_kind(st.st_mode)}); refused", str(path))
        if st.st_size > max_bytes:
            raise UnsafeFileError(
                errno.EFBIG, f"is {st.st_size} bytes, over the limit of {max_bytes}; refused", str(path)
            )
        os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        yield fd, st.st_size
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def read_regular(path: Path, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see :func:`open_regular`). Reads at most
    ``max_bytes`` even if the file grows while it is read."""
    with open_regular(path, max_bytes, follow_symlinks) as (fd, _size):
        parts: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
    data = b"".join(parts)
    if len(data) > max_bytes:
        raise UnsafeFileError(errno.EFBIG, f"grew past the limit of {max_bytes} bytes while read; refused", str(path))
    return data


def sha256_regular(path: Path, max_bytes: int = MAX_STORE_FILE_BYTES) -> str:
    """sha256 hex digest of a regular file, read in chunks (never held whole)."""
    h = hashlib.sha256()
    with open_regular(path, max_bytes) as (fd, _size):
        read = 0
        while chunk := os.read(fd, _CHUNK):
            read += len(chunk)
            if read > max_bytes:
                raise UnsafeFileError(errno.EFBIG, f"grew past the limit of {max_bytes} bytes; refused", str(path))
            h.update(chunk)
    return h.hexdigest()


def write_pointer(path: Path, value: str) -> None:
    """Atomically replace a pointer file (``LATEST``, ``CURRENT``) with ``value``."""
    atomic_write_text(path, value + "\n")


def read_pointer(path: Path) -> str | None:
    try:
        # a pointer is a few bytes: a FIFO, device or huge file planted in its place is refused, not read
        value = read_regular(path, 4096).decode("utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not a readable pointer file ({getattr(exc, 'strerror', None) or exc})") from None
    return value or None


class FileLock:
    """Single-writer lock on ``path`` (``fcntl.flock``), released by the kernel when the process dies.

    The lock file records the holder (pid, host, command, start time) so a second writer can
    say who is in the way.
    """

    def __init__(self, path: Path, purpose: str) -> None:
        self.path = Path(path)
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_NOFOLLOW: a `.lock` planted as a symlink must not make the writer truncate and
            # overwrite the file it points at (outside the store).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{self.path} is a symbolic link; refusing to use it as the lock file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted as .lock
            os.close(fd)
            raise StoreError(f"{self.path} is not a regular file; refusing to use it as the lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeldError(
                f"{self.path.parent} is locked by another writer ({self.holder() or 'unknown holder'}); "
                "wait for it to finish"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd

    def holder(self) -> str | None:
        try:
            info = json.loads(read_regular(self.path, 4096, follow_symlinks=False).decode("utf-8"))
            if not isinstance(info, dict):
                return None
        except (OSError, ValueError):
            return None
        return f"pid {info.get('pid')} on {info.get('host')}, {info.get('purpose')} since {info.get('since')}"

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
