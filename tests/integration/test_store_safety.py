"""Crash safety, the single-writer lock and bad inputs of `cvm update`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import init_store, run_cli
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.fsutil import TMP_PREFIX, FileLock


def _update(workdir: Path, data: Path, *extra: str) -> int:
    return run_cli(
        "-q", "update", "--workdir", str(workdir), "--data", str(data), "--no-progress", "--epochs", "1", *extra
    )


@pytest.fixture()
def store(fashion_table: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "20")
    return wd


@pytest.mark.parametrize("point", ["checkpoint_files_written", "before_rename", "before_pointer"])
def test_crash_between_temp_write_and_rename_keeps_previous_version(store: Path, class_folders, point: str) -> None:
    data = class_folders([0, 1], per_class=20)
    env = dict(os.environ, CVM_FAULT_AT=f"{point}:exit")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvm_edge.cli",
            "-q",
            "update",
            "--workdir",
            str(store),
            "--data",
            str(data),
            "--epochs",
            "1",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 137, proc.stderr
    s = CheckpointStore(store)
    assert s.latest() == 1
    s.load()  # the previous version is complete and loadable
    leftovers = [p for p in (store / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    if point != "before_pointer":
        assert leftovers, "the crash should leave a temp dir behind for this test to mean anything"
    # next start cleans stale temp dirs and succeeds
    assert _update(store, data) == 0
    assert not [p for p in (store / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert s.load().seen == (0, 1)


def test_lock_refuses_second_writer(store: Path, class_folders, capsys) -> None:
    data = class_folders([0, 1], per_class=10)
    with FileLock(store / ".lock", "test holder"):
        assert _update(store, data) == 1
    err = capsys.readouterr().err
    assert "locked by another writer" in err and "test holder" in err and f"pid {os.getpid()}" in err
    assert CheckpointStore(store).versions() == [1]


def test_unknown_class_is_refused_with_how_to_add(store: Path, tmp_path: Path, class_folders, capsys) -> None:
    data = class_folders([0], per_class=5)
    (data / "sock").mkdir()
    (data / "t-shirt-top" / "0000.png").rename(data / "sock" / "0.png")
    assert _update(store, data) == 1
    err = capsys.readouterr().err
    assert "'sock'" in err and "cvm embed extend" in err and "--concepts" in err


def test_empty_class_folder(store: Path, class_folders, capsys) -> None:
    data = class_folders([0], per_class=5)
    (data / "trouser").mkdir()
    assert _update(store, data) == 1
    assert "holds no images" in capsys.readouterr().err


def test_corrupt_image_listed_or_skipped(store: Path, class_folders, capsys, caplog) -> None:
    data = class_folders([0, 1], per_class=10)
    bad = data / "trouser" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert _update(store, data) == 1
    err = capsys.readouterr().err
    assert "1 unreadable image(s)" in err and "broken.png" in err and "--skip-bad-images" in err
    assert CheckpointStore(store).versions() == [1]
    assert _update(store, data, "--skip-bad-images") == 0
    assert any("skipping unreadable image" in r.getMessage() and "broken.png" in r.getMessage() for r in caplog.records)


def test_labels_csv_layout(store: Path, class_folders, tmp_path: Path) -> None:
    data = class_folders([0, 1], per_class=10)
    rows = ["path,label"] + [
        f"{p.relative_to(data)},{'T-shirt/top' if p.parent.name == 't-shirt-top' else 'Trouser'}"
        for p in sorted(data.rglob("*.png"))
    ]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    assert _update(store, data) == 0
    assert CheckpointStore(store).load().seen == (0, 1)
    (data / "labels.csv").write_text("path,label\n../../outside.png,Trouser\n")
    assert _update(store, data) == 1


def test_table_checkpoint_mismatch(store: Path, class_folders, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.txt"
    other.write_text("T-shirt/top\nTrouser\n")
    assert run_cli("-q", "embed", "build", "--classes", str(other), "--out", str(tmp_path / "other.npz")) == 0
    capsys.readouterr()
    data = class_folders([0, 1], per_class=5)
    assert _update(store, data, "--concepts", str(tmp_path / "other.npz")) == 1
    assert "not an append-only extension" in capsys.readouterr().err


def test_extended_table_adds_classes(store: Path, sample, tmp_path: Path, fashion_table: Path) -> None:
    from cvm_edge.demo import write_class_folders

    (tmp_path / "new.txt").write_text("sock\n")
    ext = tmp_path / "ext.npz"
    assert (
        run_cli(
            "-q",
            "embed",
            "extend",
            "--table",
            str(fashion_table),
            "--classes",
            str(tmp_path / "new.txt"),
            "--out",
            str(ext),
        )
        == 0
    )
    # pretend bags are socks: the point is the row, not the semantics
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "sock", "Ankle boot"]
    data = write_class_folders(tmp_path / "d", sample["train_images"], sample["train_labels"], names, [8])
    assert _update(store, data, "--concepts", str(ext)) == 0
    ck = CheckpointStore(store).load()
    assert ck.seen == (10,) and ck.table.names[10] == "sock"


def test_init_twice_and_bad_flags(store: Path, fashion_table: Path, capsys) -> None:
    code = run_cli(
        "init",
        "--workdir",
        str(store),
        "--concepts",
        str(fashion_table),
        "--backbone",
        "resnet10_cifar_slim",
        "--pretrained",
        "none",
        "--image-size",
        "32",
    )
    assert code == 1 and "already initialised" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli("update", "--workdir", str(store), "--data", "x", "--plugins", "replay,magic")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        run_cli("update", "--workdir", str(store), "--data", "x", "--epochs", "0")
    assert exc.value.code == 2
    assert run_cli("status", "--workdir", str(store.parent / "nowhere")) == 1
