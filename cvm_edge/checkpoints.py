"""Versioned checkpoint store: ``<workdir>/checkpoints/vNNNNNN/`` plus a ``LATEST`` pointer.

A version is written into a temp dir, fsynced, renamed into place, and only then does
``LATEST`` move (atomically). A crash at any point leaves the previous version current.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge.analytic_learner import ANALYTIC_FILE, AnalyticState
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import (
    InjectedFault,
    clean_stale_tmp,
    fault_point,
    make_tmp_dir,
    publish_dir,
    read_pointer,
    remove_tmp_dir,
    write_error,
    write_pointer,
)
from cvm_edge.model import ModelConfig
from cvm_edge.preprocess import Preprocessing
from cvm_edge.store_checks import file_digests, read_meta_file, verify_files

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v(\d{6})$")
FORMAT = 1


def version_name(version: int) -> str:
    return f"v{version:06d}"


def parse_version(text: str) -> int:
    """``"3"``, ``"v3"`` or ``"v000003"`` -> 3. Anything else is refused (it may name a path)."""
    m = re.fullmatch(r"v?(\d{1,6})", text.strip())
    if not m or int(m.group(1)) < 1:
        raise StoreError(f"not a version: {text[:40]!r} (expected a number such as 3 or v000003)")
    return int(m.group(1))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One complete, loadable state of the device model."""

    model_config: ModelConfig
    prep: Preprocessing
    table: ConceptTable
    weights: dict[str, torch.Tensor]
    buffer: ReplayBuffer
    val: ImageSet  # held-out images of every class seen so far
    seen: tuple[int, ...]  # table rows trained so far
    history: tuple[dict[str, Any], ...]  # one entry per update
    plugin_state: dict[str, dict[str, torch.Tensor]]
    plugins: tuple[str, ...] = ()
    # Analytic stores (ModelConfig.learner == "analytic"): ridge sums and held-out features
    # (cvm_edge.analytic_learner); their buffer and val hold no images.
    analytic: AnalyticState | None = None
    version: int = 0
    parent: int | None = None
    created_at: str = ""

    @property
    def seen_names(self) -> list[str]:
        return [self.table.names[i] for i in self.seen]


def _save_imageset(path: Path, data: ImageSet) -> None:
    buf = io.BytesIO()
    np.savez(buf, pixels=data.pixels, labels=data.labels)
    path.write_bytes(buf.getvalue())


def _load_imageset(path: Path) -> ImageSet:
    with np.load(path, allow_pickle=False) as z:
        return ImageSet(z["pixels"], z["labels"])


class CheckpointStore:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "checkpoints"
        self.lock_path = self.workdir / ".lock"

    @property
    def latest_pointer(self) -> Path:
        return self.root / "LATEST"

    def exists(self) -> bool:
        return self.latest_pointer.is_file()

    def clean_stale(self) -> list[Path]:
        """Remove temp dirs of crashed writers, checkpoints and bundles alike (a writer killed while
        exporting leaves ``bundles/.tmp-*``; the next start of any writer must remove it). Call
        while holding the lock."""
        return clean_stale_tmp(self.root) + clean_stale_tmp(self.workdir / "bundles")

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = VERSION_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int:
        value = read_pointer(self.latest_pointer)
        if value is None:
            raise StoreError(f"{self.workdir} has no checkpoints; run `cvm init --workdir {self.workdir} ...` first")
        m = VERSION_RE.match(value)
        if not m or not (self.root / value / "meta.json").is_file():
            raise StoreError(f"{self.latest_pointer} names {value!r}, which is not a complete version")
        return int(m.group(1))

    def path(self, version: int) -> Path:
        return self.root / version_name(version)

    def save(self, ckpt: Checkpoint) -> int:
        """Write ``ckpt`` as the next version and point ``LATEST`` at it. Returns the version."""
        versions = self.versions()
        version = (versions[-1] if versions else 0) + 1
        parent = read_pointer(self.latest_pointer)
        try:
            tmp = make_tmp_dir(self.root, version_name(version))
        except OSError as exc:
            raise StoreError(f"{write_error('a new checkpoint', self.root, exc)}; nothing was written") from None
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        meta = {
            "format": FORMAT,
            "version": version,
            "parent": parse_version(parent) if parent else None,
            "created_at": created,
            "model": ckpt.model_config.to_dict(),
            "preprocessing": ckpt.prep.to_dict(),
            "table_fingerprint": ckpt.table.fingerprint,
            "seen": list(ckpt.seen),
            "seen_names": ckpt.seen_names,
            "plugins": list(ckpt.plugins),
            "history": list(ckpt.history),
        }
        name = version_name(version)
        try:
            torch.save(ckpt.weights, tmp / "model.pt")
            torch.save(ckpt.plugin_state, tmp / "plugins.pt")
            (tmp / "concepts.npz").write_bytes(ckpt.table.to_bytes())
            (tmp / "buffer.npz").write_bytes(ckpt.buffer.to_bytes())
            _save_imageset(tmp / "val.npz", ckpt.val)
            if ckpt.analytic is not None:
                (tmp / ANALYTIC_FILE).write_bytes(ckpt.analytic.to_bytes())
            fault_point("checkpoint_files_written")
            meta["files"] = file_digests(tmp)  # sha256 of every file above, checked on every load
            # what the version costs on flash (meta.json aside), for `cvm status` and the update report
            meta["files_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
            # meta.json last: a version directory without it is never considered complete
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            publish_dir(tmp, self.path(version))
        except InjectedFault:
            raise
        except (OSError, RuntimeError, ValueError) as exc:  # a full disk reaches torch/numpy as any of these
            error = write_error(f"checkpoint {name}", self.root, exc)
            remove_tmp_dir(tmp)  # give the space back; the previous version is untouched
            raise StoreError(f"{error}; {parent or 'the previous version'} stays current") from None
        fault_point("before_pointer")
        try:
            write_pointer(self.latest_pointer, name)
        except OSError as exc:
            error = write_error("the LATEST pointer", self.root, exc)
            if read_pointer(self.latest_pointer) != name:  # nothing names the new version: free its space
                remove_tmp_dir(self.path(version))
            raise StoreError(f"{error}; {read_pointer(self.latest_pointer)} stays current") from None
        log.info("published checkpoint %s", name)
        return version

    def version_bytes(self, version: int) -> int:
        """Bytes the version's files take on disk."""
        return sum(f.stat().st_size for f in self.path(version).iterdir() if f.is_file())

    def load(self, version: int | None = None) -> Checkpoint:
        version = self.latest() if version is None else version
        d = self.path(version)
        if not (d / "meta.json").is_file():
            raise StoreError(f"version {version_name(version)} does not exist in {self.workdir}")
        meta = self.read_meta(version)  # schema checked: no value of it is used unchecked
        verify_files(d, meta)  # regular files, sha256 as recorded, before torch or numpy reads one
        try:
            table = ConceptTable.load(d / "concepts.npz")
            weights = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
            plugin_state = torch.load(d / "plugins.pt", map_location="cpu", weights_only=True)
            buffer = ReplayBuffer.load(d / "buffer.npz")
            val = _load_imageset(d / "val.npz")
            config = ModelConfig.from_dict(meta["model"])
            analytic = AnalyticState.from_bytes((d / ANALYTIC_FILE).read_bytes()) if config.analytic else None
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable part makes the version unusable
            raise StoreError(f"version {version_name(version)} is unreadable: {exc}") from None
        if meta.get("table_fingerprint") != table.fingerprint:
            raise StoreError(f"version {version_name(version)}: concept table does not match its metadata")
        if any(i >= len(table) for i in meta["seen"]) or meta["seen_names"] != [table.names[i] for i in meta["seen"]]:
            raise StoreError(f"{d / 'meta.json'}: seen classes do not match the concept table; refusing to use it")
        return Checkpoint(
            model_config=config,
            prep=Preprocessing.from_dict(meta["preprocessing"]),
            table=table,
            weights=weights,
            buffer=buffer,
            val=val,
            seen=tuple(meta["seen"]),
            history=tuple(meta["history"]),
            plugin_state=plugin_state,
            plugins=tuple(meta.get("plugins", ())),
            analytic=analytic,
            version=version,
            parent=meta.get("parent"),
            created_at=meta.get("created_at", ""),
        )

    def read_meta(self, version: int) -> dict[str, Any]:
        return read_meta_file(self.path(version) / "meta.json", version)

    def rollback(self, to: int | None = None, before_move: Callable[[int], None] | None = None) -> int:
        """Point LATEST at ``to`` (default: the current version's parent). Call while holding the lock.

        ``before_move(to)`` runs after ``to`` has loaded and verified, before LATEST moves: it checks
        what else must move with it (the bundle), so a failure there leaves every pointer as it was."""
        current = self.latest()
        if to is None:
            parent = self.read_meta(current).get("parent")
            if parent is None:
                raise StoreError(f"{version_name(current)} has no earlier version to roll back to")
            to = int(parent)
        if to not in self.versions():
            raise StoreError(
                f"version {version_name(to)} does not exist (have: {', '.join(map(version_name, self.versions()))})"
            )
        self.load(to)  # refuse to point at something that does not load
        if before_move is not None:
            before_move(to)
        write_pointer(self.latest_pointer, version_name(to))
        return to
