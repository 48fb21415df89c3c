"""The concept-table job with the real bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from cvm_edge.concepts import ConceptTable


def test_semantics_kitten_nearer_cat_than_truck(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("cat\ntruck\nkitten\n")
    assert run_cli("-q", "embed", "build", "--classes", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t.npz")) == 0
    t = ConceptTable.load(tmp_path / "t.npz")
    v = t.as_float32()
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=2e-3)
    assert v[2] @ v[0] > v[2] @ v[1] + 0.1
    assert t.dim == 384 and t.vectors.dtype == np.float16
    assert t.encoder_id == "sentence-transformers/all-MiniLM-L6-v2" and len(t.encoder_sha256) == 64
    assert len(t.templates) >= 2


def test_yaml_with_descriptions_and_custom_templates(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("- name: cat\n  descriptions: [a small furry pet that purrs]\n- dog\n")
    out = tmp_path / "t.npz"
    code = run_cli(
        "-q",
        "embed",
        "build",
        "--classes",
        str(tmp_path / "c.yaml"),
        "--out",
        str(out),
        "--template",
        "a photo of a {}.",
        "--template",
        "a drawing of a {}.",
    )
    assert code == 0
    t = ConceptTable.load(out)
    assert t.names == ("cat", "dog")
    assert t.templates == ("a photo of a {}.", "a drawing of a {}.")
    assert t.descriptions == (("a small furry pet that purrs",), ())


def test_extend_keeps_existing_rows_bit_identical(fashion_table: Path, tmp_path: Path) -> None:
    (tmp_path / "new.txt").write_text("sock\nscarf\n")
    out = tmp_path / "ext.npz"
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
            str(out),
        )
        == 0
    )
    old, new = ConceptTable.load(fashion_table), ConceptTable.load(out)
    assert new.names[: len(old)] == old.names and new.names[len(old) :] == ("sock", "scarf")
    assert np.array_equal(new.vectors[: len(old)].view(np.uint16), old.vectors.view(np.uint16))
    assert old.is_prefix_of(new)


def test_extend_refuses_encoder_mismatch(fashion_table: Path, tmp_path: Path, capsys) -> None:
    t = ConceptTable.load(fashion_table)
    dataclasses.replace(t, encoder_sha256="0" * 64).save(tmp_path / "other.npz")
    (tmp_path / "new.txt").write_text("sock\n")
    code = run_cli(
        "-q",
        "embed",
        "extend",
        "--table",
        str(tmp_path / "other.npz"),
        "--classes",
        str(tmp_path / "new.txt"),
        "--out",
        str(tmp_path / "x.npz"),
    )
    assert code == 1
    assert "encoder mismatch" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".txt", "is empty"),
        ("cat\ncat\n", ".txt", "duplicate class name"),
        ("- name: [1\n", ".yaml", "invalid YAML"),
    ],
)
def test_bad_class_files_exit_1(tmp_path: Path, capsys, content: str, suffix: str, message: str) -> None:
    f = tmp_path / f"c{suffix}"
    f.write_text(content)
    assert run_cli("-q", "embed", "build", "--classes", str(f), "--out", str(tmp_path / "t.npz")) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t.npz").exists()


def test_unreadable_model_exit_1(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.txt").write_text("cat\n")
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    assert (
        run_cli(
            "-q",
            "embed",
            "build",
            "--classes",
            str(tmp_path / "c.txt"),
            "--out",
            str(tmp_path / "t.npz"),
            "--model",
            str(bad),
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "cannot load text model" in err and len(err.splitlines()) == 1


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert run_cli("embed", "build", "--classes", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.npz")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("embed", "build", "--out", "x.npz") == 2  # neither --classes nor --descriptions
    assert "give --classes FILE, --descriptions FILE.yaml, or both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli("embed", "build", "--classes", "c.txt")  # --out missing: argparse usage error
    assert exc.value.code == 2


def test_similar_classes_warn(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.txt").write_text("car\nautomobile\nbag\n")
    assert run_cli("-q", "embed", "build", "--classes", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t.npz")) == 0
    err = capsys.readouterr().err
    assert "warning: classes 'car' and 'automobile' are very similar" in err
    assert "'bag'" not in err
