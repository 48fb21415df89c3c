"""The on-disk layout of a workdir, and the one sequence that publishes a version into it.

::

    <workdir>/
      .lock                  the single writer's lock (init, update, export, rollback, prune)
      checkpoints/
        v000001/ ...         one directory per version (meta.json last: without it, not a version)
        graphs/<sha256>.onnx the frozen backbone graphs versions name, shared between them
        LATEST               the current version's directory name
      bundles/
        v000001-fp32/ ...    exported bundles (manifest.json last)
        CURRENT              the bundle the server serves

Checkpoints and bundles are published the same way (:func:`publish_version`): files are written
into a temp directory beside the final one, fsynced, the directory is renamed into place, and only
then does the pointer move (an atomic rename of a small file). A crash or a full disk at any point
leaves the previous version current and nothing half-written under a final name. Torch-free: the
server and the fleet read the layout without loading a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from cvm_edge.errors import StoreError
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each part of a workdir lives."""

    workdir: Path

    @property
    def lock(self) -> Path:
        return self.workdir / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.workdir / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "LATEST"

    @property
    def graphs(self) -> Path:
        return self.checkpoints / "graphs"

    @property
    def bundles(self) -> Path:
        return self.workdir / "bundles"

    @property
    def current(self) -> Path:
        return self.bundles / "CURRENT"

    def version_dir(self, name: str) -> Path:
        return self.checkpoints / name

    def bundle_dir(self, name: str) -> Path:
        return self.bundles / name


def layout(workdir: Path | str) -> Layout:
    return Layout(Path(workdir))


@dataclasses.dataclass(frozen=True)
class Publication:
    """One version to publish: ``write(tmp)`` fills the temp directory; ``what`` names it in errors
    ("checkpoint v000003"); ``keeps`` says what stays current when it fails, ``{}`` standing for
    what the pointer names then (``unnamed`` when nothing); ``pointer_fault`` is the fault point
    the kill tests stop the writer at after the rename, before the pointer moves."""

    parent: Path
    name: str
    pointer: Path
    what: str
    keeps: str
    unnamed: str
    pointer_fault: str

    def current(self) -> str | None:
        """What the pointer names now (read again: a failed move may still have moved it)."""
        try:
            return read_pointer(self.pointer)
        except StoreError:  # an unreadable pointer must not hide the error being reported
            return None

    def kept(self, current: str | None = None) -> str:
        return self.keeps.format(current or self.current() or self.unnamed)


def publish_version(pub: Publication, write: Callable[[Path], None]) -> Path:
    """Write, fsync and rename ``pub.parent/pub.name`` into place, then move ``pub.pointer`` to it.

    ``write`` may raise StoreError itself (e.g. a version that would not read back): the temp
    directory is removed and the error passes through. An OSError (or the RuntimeError/ValueError
    that torch and numpy raise for a full disk) becomes a StoreError that names the cause and says
    what stays current. Call while holding the workdir's lock."""
    try:
        tmp = make_tmp_dir(pub.parent, pub.name)
    except OSError as exc:
        raise StoreError(f"{write_error(pub.what, pub.parent, exc)}; nothing was written, {pub.kept()}") from None
    final = pub.parent / pub.name
    try:
        write(tmp)
        publish_dir(tmp, final)
    except InjectedFault:
        raise
    except StoreError:
        remove_tmp_dir(tmp)
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # a full disk reaches torch/numpy as any of these
        error = write_error(pub.what, pub.parent, exc)
        remove_tmp_dir(tmp)  # give the space back; the previous version is untouched
        raise StoreError(f"{error}; {pub.kept()}") from None
    fault_point(pub.pointer_fault)
    try:
        write_pointer(pub.pointer, pub.name)
    except OSError as exc:
        error = write_error(f"the {pub.pointer.name} pointer", pub.parent, exc)
        current = pub.current()
        if current != pub.name:  # nothing names the new version: free its space
            remove_tmp_dir(final)
        raise StoreError(f"{error}; {pub.kept(current)}") from None
    return final
