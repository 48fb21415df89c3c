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
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge import vocabulary
from cvm_edge.analytic_learner import ANALYTIC_FILE, AnalyticState
from cvm_edge.backbone_graph import graph_digest
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import (
    TMP_PREFIX,
    atomic_write_bytes,
    clean_stale_tmp,
    fault_point,
    fsync_dir,
    read_pointer,
    read_regular,
    remove_tmp_dir,
    sha256_regular,
    write_pointer,
)
from cvm_edge.image_codec import decode_images, encode_images
from cvm_edge.model import ModelConfig
from cvm_edge.preprocess import Preprocessing
from cvm_edge.schema import strict_json
from cvm_edge.store_checks import check_meta, file_digests, read_meta_file, verify_files
from cvm_edge.workdir import Publication, layout, publish_version

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v(\d{6})$")
# A bundle's name starts with the version it was exported from (deploy.bundle.NAME_RE; that module is
# the serving side's and is not imported here).
BUNDLE_VERSION_RE = re.compile(r"^v(\d{6})(?:-(?:fp16|int8))?(?:\.\d+)?$")
FORMAT = 1
# A frozen backbone's weights (train_backbone "none"): the same in every version, so they are kept in their own
# file, which a new version hard-links from its parent instead of copying (see CheckpointStore._share_unchanged).
BACKBONE_FILE = "backbone.pt"
# Content-addressed backbone graphs (cvm_edge.backbone_graph), ``<root>/graphs/<sha256>.onnx``: derived
# from the frozen backbone, the same for every version, so kept once beside the versions and named
# by sha256 in each version's meta.json, not copied into each version.
MAX_GRAPH_BYTES = 1 << 30
# How many of the newest versions a store keeps (``cvm init/update --keep-versions``; 0 keeps all).
DEFAULT_KEEP_VERSIONS = vocabulary.DEFAULT_KEEP_VERSIONS


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
    # The frozen backbone as an ONNX graph (cvm_edge.backbone_graph; analytic stores): what runs it
    # without timm. None in gradient stores and in analytic stores from before it.
    backbone_graph: bytes | None = None
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # a store setting, recorded in every version's meta.json
    version: int = 0
    parent: int | None = None
    created_at: str = ""

    @property
    def seen_names(self) -> list[str]:
        return [self.table.names[i] for i in self.seen]


def _save_imageset(path: Path, data: ImageSet) -> None:
    """Held-out images as lossless PNG bytes (bit-identical on load), not decoded pixels."""
    buf = io.BytesIO()
    arrays: dict[str, Any] = {**encode_images(data.pixels), "labels": data.labels}  # Any: numpy's stub
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _load_imageset(path: Path) -> ImageSet:
    with np.load(path, allow_pickle=False) as z:
        if "pixels" in z.files:  # written before images were stored encoded
            return ImageSet(z["pixels"], z["labels"])
        return ImageSet(decode_images(z["png"], z["png_offsets"], z["image_shape"]), z["labels"])


class CheckpointStore:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.layout = layout(self.workdir)
        self.root = self.layout.checkpoints
        self.lock_path = self.layout.lock

    @property
    def latest_pointer(self) -> Path:
        return self.layout.latest

    def exists(self) -> bool:
        return self.latest_pointer.is_file()

    def clean_stale(self) -> list[Path]:
        """Remove temp dirs of crashed writers, checkpoints and bundles alike (a writer killed while
        exporting leaves ``bundles/.tmp-*``; the next start of any writer must remove it). Call
        while holding the lock."""
        return clean_stale_tmp(self.root) + clean_stale_tmp(self.layout.bundles)

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
        parent_version = parse_version(parent) if parent else None
        name = version_name(version)
        pub = Publication(
            parent=self.root,
            name=name,
            pointer=self.latest_pointer,
            what=f"checkpoint {name}",
            keeps="{} stays current",
            unnamed="the previous version",
            pointer_fault="before_pointer",
        )
        publish_version(pub, lambda tmp: self._write_version(tmp, ckpt, version, parent_version, pub.kept()))
        log.info("published checkpoint %s", name)
        return version

    def _write_version(self, tmp: Path, ckpt: Checkpoint, version: int, parent_version: int | None, keeps: str) -> None:
        """Every file of a version into ``tmp``, ``meta.json`` (with their sha256) last."""
        meta = {
            "format": FORMAT,
            "version": version,
            "parent": parent_version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": ckpt.model_config.to_dict(),
            "preprocessing": ckpt.prep.to_dict(),
            "table_fingerprint": ckpt.table.fingerprint,
            "seen": list(ckpt.seen),
            "seen_names": ckpt.seen_names,
            "plugins": list(ckpt.plugins),
            "history": list(ckpt.history),
            "keep_versions": ckpt.keep_versions,
        }
        frozen = ckpt.model_config.train_backbone == "none"
        backbone = {k: v for k, v in ckpt.weights.items() if frozen and k.startswith("backbone.")}
        torch.save({k: v for k, v in ckpt.weights.items() if k not in backbone}, tmp / "model.pt")
        if backbone:
            torch.save(backbone, tmp / BACKBONE_FILE)
        torch.save(ckpt.plugin_state, tmp / "plugins.pt")
        (tmp / "concepts.npz").write_bytes(ckpt.table.to_bytes())
        (tmp / "buffer.npz").write_bytes(ckpt.buffer.to_bytes())
        _save_imageset(tmp / "val.npz", ckpt.val)
        if ckpt.analytic is not None:
            with (tmp / ANALYTIC_FILE).open("wb") as f:  # streamed: G is the largest file of a store
                ckpt.analytic.write(f)
        if ckpt.backbone_graph is not None:
            meta["backbone_graph"] = self._keep_graph(ckpt.backbone_graph)
        fault_point("checkpoint_files_written")
        files = file_digests(tmp)  # sha256 of every file above, checked on every load
        meta["files"] = files
        if parent_version is not None and BACKBONE_FILE in files:
            self._share_unchanged(tmp / BACKBONE_FILE, self.path(parent_version) / BACKBONE_FILE)
        # what the version costs on flash (meta.json aside), for `cvm status` and the update report
        meta["files_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        # meta.json last: a version directory without it is never considered complete. It is checked
        # as load() will read it back first (strict JSON, no NaN; the schema): a version that could
        # not be loaded again is never published.
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        name = version_name(version)
        try:
            check_meta(strict_json(text.encode()), f"{name}/meta.json", version)
        except (ValueError, StoreError) as exc:
            raise StoreError(f"checkpoint {name} would not read back ({exc}); {keeps}") from None
        (tmp / "meta.json").write_text(text, encoding="utf-8")

    def graph_path(self, sha256: str) -> Path:
        return self.layout.graphs / f"{sha256}.onnx"

    def _keep_graph(self, graph: bytes) -> str:
        """Write the backbone graph once for all versions (it never changes); returns its sha256."""
        digest = graph_digest(graph)
        path = self.graph_path(digest)
        if self._read_graph(digest, quiet=True) is None:
            path.parent.mkdir(exist_ok=True)
            atomic_write_bytes(path, graph)
        return digest

    def _read_graph(self, sha256: str, quiet: bool = False) -> bytes | None:
        """The backbone graph a version names, as read and hashed (a regular file, no symlink); None, so
        that the update builds the backbone in torch and makes the graph again, when it is missing or
        its bytes are not the recorded ones."""
        path = self.graph_path(sha256)
        try:
            graph = read_regular(path, MAX_GRAPH_BYTES, follow_symlinks=False)
        except OSError as exc:
            if not quiet:
                log.warning("the backbone graph %s is unreadable (%s); the backbone runs in torch", path, exc)
            return None
        if graph_digest(graph) != sha256:
            if not quiet:
                log.warning("%s does not match its recorded sha256; the backbone runs in torch", path)
            return None
        return graph

    @staticmethod
    def _share_unchanged(new: Path, old: Path) -> None:
        """Replace ``new`` by a hard link to ``old`` when their bytes are equal: an unchanged frozen backbone
        then takes flash once, not once per kept version. Each version still holds the whole file (pruning
        one removes only its name) and its sha256 is checked on load; where the file system has no hard
        links (FAT), the copy stays. Nothing rewrites a published file in place, so the sharing is safe."""
        try:
            if old.stat().st_size != new.stat().st_size or sha256_regular(old) != sha256_regular(new):
                return
            link = new.with_name(f"{TMP_PREFIX}link-{new.name}")
            os.link(old, link)
            os.replace(link, new)
        except OSError as exc:
            log.debug("keeping a copy of %s (%s)", new.name, exc)

    def version_bytes(self, version: int) -> int:
        """Bytes the version's files take on disk."""
        return sum(f.stat().st_size for f in self.path(version).iterdir() if f.is_file())

    def load(self, version: int | None = None, ridge_statistics: bool = True) -> Checkpoint:
        """A verified version. ``ridge_statistics=False`` leaves an analytic store's sums unread
        (``analytic`` is None): what serves the model (export) does not need G, ~50 MB at M = 2,048."""
        version = self.latest() if version is None else version
        d = self.path(version)
        if not (d / "meta.json").is_file():
            raise StoreError(f"version {version_name(version)} does not exist in {self.workdir}")
        meta = self.read_meta(version)  # schema checked: no value of it is used unchecked
        verify_files(d, meta)  # regular files, sha256 as recorded, before torch or numpy reads one
        try:
            table = ConceptTable.load(d / "concepts.npz")
            weights = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
            if BACKBONE_FILE in meta.get("files", {}):  # verified above like every recorded file
                weights.update(torch.load(d / BACKBONE_FILE, map_location="cpu", weights_only=True))
            plugin_state = torch.load(d / "plugins.pt", map_location="cpu", weights_only=True)
            buffer = ReplayBuffer.load(d / "buffer.npz")
            val = _load_imageset(d / "val.npz")
            config = ModelConfig.from_dict(meta["model"])
            analytic = (
                AnalyticState.from_bytes((d / ANALYTIC_FILE).read_bytes())
                if config.analytic and ridge_statistics
                else None
            )
            graph = self._read_graph(meta["backbone_graph"]) if "backbone_graph" in meta else None
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
            backbone_graph=graph,
            keep_versions=int(meta.get("keep_versions", DEFAULT_KEEP_VERSIONS)),  # stores from before: the default
            version=version,
            parent=meta.get("parent"),
            created_at=meta.get("created_at", ""),
        )

    def read_meta(self, version: int) -> dict[str, Any]:
        return read_meta_file(self.path(version) / "meta.json", version)

    def keep_setting(self) -> int:
        """The store's --keep-versions, as the current version records it."""
        return int(self.read_meta(self.latest()).get("keep_versions", DEFAULT_KEEP_VERSIONS))

    def serving_version(self) -> int | None:
        """The checkpoint version of the bundle ``bundles/CURRENT`` names (None: no bundle published)."""
        m = BUNDLE_VERSION_RE.match(read_pointer(self.layout.current) or "")
        return int(m.group(1)) if m else None

    def kept_versions(self, keep: int) -> list[int]:
        """The versions :meth:`prune` keeps: the newest ``keep`` (all when 0), the one LATEST names and the
        one the serving bundle was exported from."""
        versions = self.versions()
        kept = set(versions if keep <= 0 else versions[-keep:]) | {self.latest()}
        serving = self.serving_version()
        if serving is not None:
            kept.add(serving)
        return sorted(v for v in kept if v in versions)

    def prune(self, keep: int) -> list[int]:
        """Remove the versions :meth:`kept_versions` does not keep, and their bundles (never the serving
        one). Call while holding the lock, after a publish. Returns the versions removed.

        Each version is first renamed to a temp name (atomic; :meth:`versions` no longer lists it and
        :meth:`clean_stale` removes what a crash leaves), then deleted: at every instant the store holds
        whole versions only, and LATEST and CURRENT name ones that are kept."""
        kept = set(self.kept_versions(keep))
        doomed = [v for v in self.versions() if v not in kept]
        bundles = self.layout.bundles
        serving_bundle = read_pointer(self.layout.current)
        for v in doomed:
            self._retire(self.path(v))
            if bundles.is_dir():
                for entry in sorted(bundles.iterdir()):
                    m = BUNDLE_VERSION_RE.match(entry.name)
                    if m and int(m.group(1)) == v and entry.name != serving_bundle and entry.is_dir():
                        self._retire(entry)
            log.info("pruned checkpoint %s (keeping the newest %d)", version_name(v), keep)
        return doomed

    @staticmethod
    def _retire(path: Path) -> None:
        tmp = path.parent / f"{TMP_PREFIX}pruned-{path.name}.{os.getpid()}.{time.monotonic_ns()}"
        os.rename(path, tmp)
        fsync_dir(path.parent)
        fault_point("prune_renamed")  # a crash here leaves a temp dir that clean_stale removes
        remove_tmp_dir(tmp)

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
            have = ", ".join(map(version_name, self.versions()))
            if to < max(self.versions(), default=0):
                keep = self.keep_setting()
                raise StoreError(
                    f"version {version_name(to)} is no longer kept: the store keeps the newest {keep} versions "
                    f"(--keep-versions; plus the current one and the one the serving bundle came from). Kept: {have}"
                )
            raise StoreError(f"version {version_name(to)} does not exist (have: {have})")
        self.load(to)  # refuse to point at something that does not load
        if before_move is not None:
            before_move(to)
        write_pointer(self.latest_pointer, version_name(to))
        return to
