"""Bundles: ``model.onnx`` + ``concepts.npz`` + ``manifest.json`` under ``<workdir>/bundles/<name>/``.

A bundle is written into a temp dir, fsynced and renamed into place (the same primitives as the
checkpoint store), and only then does the ``CURRENT`` pointer move. Readers verify the sha256 of
``model.onnx`` against the manifest before anything loads it. numpy only: the serving side never
imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cvm_edge.errors import ModelLoadError, StoreError
from cvm_edge.fsutil import (
    InjectedFault,
    fault_point,
    make_tmp_dir,
    publish_dir,
    read_pointer,
    remove_tmp_dir,
    write_error,
    write_pointer,
)
from cvm_edge.preprocess import Preprocessing

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = "model.onnx"
CONCEPTS_FILE = "concepts.npz"
MANIFEST_FILE = "manifest.json"
POINTER = "CURRENT"
PRECISIONS = ("fp32", "fp16", "int8")
# v000003 (fp32), v000003-int8, and a revision suffix when the same version is exported again: v000003-int8.2
NAME_RE = re.compile(r"^v(\d{6})(?:-(fp16|int8))?(?:\.(\d+))?$")
REQUIRED_KEYS = ("format", "name", "version", "precision", "opset", "preprocessing", "classes", "model_sha256")


def bundles_root(workdir: Path) -> Path:
    return Path(workdir) / "bundles"


def checkpoint_dir_name(version: int) -> str:
    """Same as ``cvm_edge.checkpoints.version_name`` (that module imports torch; this one must not)."""
    return f"v{version:06d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_bundle_name(root: Path, version: int, precision: str) -> str:
    """``v000003`` for fp32, ``v000003-int8`` otherwise; ``.2``, ``.3`` ... when that name is taken."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    base = checkpoint_dir_name(version) + ("" if precision == "fp32" else f"-{precision}")
    name, rev = base, 1
    while (root / name).exists():
        rev += 1
        name = f"{base}.{rev}"
    return name


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A bundle directory and its parsed manifest (the model file itself is read by the Predictor)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.manifest["classes"]]

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    def read_verified_model(self) -> bytes:
        """The bytes of ``model.onnx`` after checking them against the manifest's sha256.

        The same bytes are handed to onnxruntime, so what was verified is what runs."""
        path = self.path / MODEL_FILE
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"bundle {self.path.name}: cannot read {MODEL_FILE}: {exc.strerror or exc}") from None
        digest = sha256_bytes(data)
        if digest != self.manifest["model_sha256"]:
            raise ModelLoadError(
                f"bundle {self.path.name}: {MODEL_FILE} sha256 {digest[:16]}... does not match the manifest "
                f"({str(self.manifest['model_sha256'])[:16]}...); refusing to load it"
            )
        return data


def load_bundle(path: Path) -> Bundle:
    """Parse and check ``manifest.json`` of a bundle directory (raises :class:`ModelLoadError`)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a bundle (no {MANIFEST_FILE})") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"bundle {path.name}: unreadable {MANIFEST_FILE}: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"bundle {path.name}: {MANIFEST_FILE} is not an object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelLoadError(f"bundle {path.name}: manifest lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ModelLoadError(f"bundle {path.name}: manifest format {manifest['format']!r}, this runtime reads {FORMAT}")
    try:
        Preprocessing.from_dict(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"bundle {path.name}: bad preprocessing in manifest: {exc}") from None
    if not manifest["classes"]:
        raise ModelLoadError(f"bundle {path.name}: manifest lists no classes")
    return Bundle(path, manifest)


def current_bundle_dir(workdir: Path) -> Path | None:
    """The directory ``<workdir>/bundles/CURRENT`` names, or None when nothing was published yet."""
    root = bundles_root(workdir)
    value = read_pointer(root / POINTER)
    if value is None:
        return None
    if not NAME_RE.match(value):
        raise StoreError(f"{root / POINTER} names {value[:60]!r}, which is not a bundle name")
    return root / value


def publish_bundle(root: Path, name: str, files: Mapping[str, bytes], manifest: dict[str, Any]) -> Path:
    """Write a bundle into a temp dir, fsync, rename it to ``root/name``, then move ``CURRENT``.

    The manifest is written last: a directory without it is never a bundle. Call while holding
    the store lock."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad bundle name {name!r}")
    previous = read_pointer(root / POINTER)
    keeps = f"the server keeps {previous or 'what it serves'}"
    try:
        tmp = make_tmp_dir(root, name)
    except OSError as exc:
        raise StoreError(f"{write_error(f'bundle {name}', root, exc)}; nothing was written, {keeps}") from None
    try:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        fault_point("bundle_files_written")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        final = root / name
        publish_dir(tmp, final)
    except InjectedFault:
        raise
    except OSError as exc:
        error = write_error(f"bundle {name}", root, exc)
        remove_tmp_dir(tmp)  # give the space back
        raise StoreError(f"{error}; {keeps}") from None
    fault_point("before_bundle_pointer")
    try:
        write_pointer(root / POINTER, name)
    except OSError as exc:
        raise StoreError(f"{write_error('the CURRENT pointer', root, exc)}; {keeps}") from None
    log.info("published bundle %s", name)
    return final


def latest_bundle_of(workdir: Path, version: int, precision: str = "fp32") -> str | None:
    """Name of the newest complete bundle exported from checkpoint ``version`` in ``precision``."""
    root = bundles_root(workdir)
    if not root.is_dir():
        return None
    best: tuple[int, str] | None = None
    for entry in root.iterdir():
        m = NAME_RE.match(entry.name)
        if not m or int(m.group(1)) != version or (m.group(2) or "fp32") != precision:
            continue
        if not (entry / MANIFEST_FILE).is_file():
            continue
        rev = int(m.group(3) or 1)
        if best is None or rev > best[0]:
            best = (rev, entry.name)
    return best[1] if best else None


def point_current(workdir: Path, name: str) -> None:
    """Move ``CURRENT`` to an existing bundle (rollback). Call while holding the store lock."""
    if not NAME_RE.match(name) or not (bundles_root(workdir) / name / MANIFEST_FILE).is_file():
        raise StoreError(f"no complete bundle named {name[:60]!r}")
    load_bundle(bundles_root(workdir) / name)  # refuse to point at something that does not verify
    write_pointer(bundles_root(workdir) / POINTER, name)
