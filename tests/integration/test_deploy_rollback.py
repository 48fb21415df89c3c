"""`cvm rollback` moves the serving bundle pointer with the checkpoint pointer."""

from __future__ import annotations

from pathlib import Path

from conftest import init_store, run_cli
from cvm_edge.checkpoints import CheckpointStore
from deploy.bundle import current_bundle_dir


def test_rollback_moves_current_bundle(fashion_table: Path, class_folders, tmp_path: Path, capsys) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "20")
    for name, classes in (("a", [0, 1]), ("b", [2, 3])):
        data = class_folders(classes, per_class=20, name=name)
        assert (
            run_cli(
                "-q", "update", "--workdir", str(wd), "--data", str(data), "--epochs", "1", "--no-progress", "--force"
            )
            == 0
        )
    cur = current_bundle_dir(wd)
    assert cur is not None and cur.name == "v000003"
    capsys.readouterr()
    assert run_cli("rollback", "--workdir", str(wd)) == 0
    assert "serving bundle is now v000002" in capsys.readouterr().out
    cur = current_bundle_dir(wd)
    assert CheckpointStore(wd).latest() == 2 and cur is not None and cur.name == "v000002"
    assert run_cli("rollback", "--workdir", str(wd), "--to", "1") == 0
    assert "has no exported bundle" in capsys.readouterr().out
    cur = current_bundle_dir(wd)
    assert cur is not None and cur.name == "v000002"  # nothing to serve for v1: the old bundle stays
