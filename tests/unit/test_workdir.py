"""The workdir layout and the one publish sequence (cvm_edge.workdir) that checkpoints and bundles share."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import cvm_edge.workdir as workdir_module
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import read_pointer, write_pointer
from cvm_edge.workdir import Publication, layout, publish_version


def _pub(root: Path, name: str = "v000002") -> Publication:
    return Publication(
        parent=root,
        name=name,
        pointer=root / "LATEST",
        what=f"checkpoint {name}",
        keeps="{} stays current",
        unnamed="the previous version",
        pointer_fault="before_pointer",
    )


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in ("LATEST", "v000001"))


def test_the_layout_names_every_part_of_a_workdir(tmp_path: Path) -> None:
    where = layout(tmp_path)
    assert where.lock == tmp_path / ".lock"
    assert where.latest == tmp_path / "checkpoints" / "LATEST"
    assert where.graphs == tmp_path / "checkpoints" / "graphs"
    assert where.current == tmp_path / "bundles" / "CURRENT"
    assert where.version_dir("v000003") == tmp_path / "checkpoints" / "v000003"
    assert where.bundle_dir("v000003-int8") == tmp_path / "bundles" / "v000003-int8"


def test_a_version_is_renamed_into_place_before_the_pointer_names_it(tmp_path: Path) -> None:
    pointer_seen: list[str | None] = []

    def write(tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"weights")
        pointer_seen.append(read_pointer(tmp_path / "LATEST"))

    write_pointer(tmp_path / "LATEST", "v000001")
    final = publish_version(_pub(tmp_path), write)
    assert final == tmp_path / "v000002" and (final / "model.pt").read_bytes() == b"weights"
    assert pointer_seen == ["v000001"] and read_pointer(tmp_path / "LATEST") == "v000002"
    assert _leftovers(tmp_path) == ["v000002"]  # no temp directory left behind


def test_a_full_disk_while_writing_leaves_the_previous_version_current_and_frees_the_space(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    write_pointer(tmp_path / "LATEST", "v000001")
    with pytest.raises(StoreError, match=r"checkpoint v000002.*v000001 stays current"):
        publish_version(_pub(tmp_path), write)
    assert read_pointer(tmp_path / "LATEST") == "v000001" and _leftovers(tmp_path) == []


def test_a_refusal_from_the_writer_passes_through_and_removes_the_temp_directory(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        raise StoreError("checkpoint v000002 would not read back")

    with pytest.raises(StoreError, match="would not read back"):
        publish_version(_pub(tmp_path), write)
    assert _leftovers(tmp_path) == []


def test_a_pointer_that_cannot_move_leaves_nothing_that_no_pointer_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pointer(tmp_path / "LATEST", "v000001")

    def full(path: Path, value: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir_module, "write_pointer", full)
    with pytest.raises(StoreError, match=r"LATEST pointer.*v000001 stays current"):
        publish_version(_pub(tmp_path), lambda tmp: (tmp / "model.pt").touch())
    assert read_pointer(tmp_path / "LATEST") == "v000001" and _leftovers(tmp_path) == []


def test_a_pointer_that_moved_before_its_write_failed_is_reported_as_it_is_and_keeps_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename of LATEST went through, the directory fsync after it failed: the new version is
    current, so the message says so and its directory stays."""
    write_pointer(tmp_path / "LATEST", "v000001")

    def moved_then_failed(path: Path, value: str) -> None:
        write_pointer(path, value)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(workdir_module, "write_pointer", moved_then_failed)
    with pytest.raises(StoreError, match=r"v000002 stays current"):
        publish_version(_pub(tmp_path), lambda tmp: (tmp / "model.pt").touch())
    assert read_pointer(tmp_path / "LATEST") == "v000002" and (tmp_path / "v000002" / "model.pt").is_file()
