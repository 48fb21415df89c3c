from __future__ import annotations

import numpy as np
import pytest

from cvm_edge.concepts import ConceptTable, normalise_rows, slugify, validate_names
from cvm_edge.errors import ConceptError


def make_table(names: list[str], dim: int = 8, seed: int = 0) -> ConceptTable:
    v = normalise_rows(np.random.default_rng(seed).normal(size=(len(names), dim)))
    return ConceptTable(tuple(names), v.astype(np.float16), "enc", "sha", ("a photo of a {}.",), "2026-01-01")


def test_slugify_makes_safe_folder_names() -> None:
    assert slugify("T-shirt/top") == "t-shirt-top"
    assert slugify("Ankle boot") == "ankle-boot"
    assert slugify("../etc/passwd") == "etc-passwd"


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "no class names"),
        (["cat", ""], "empty"),
        (["cat", "cat"], "duplicate"),
        (["a b", "A-B"], "share the folder slug"),
        (["!!!"], "no letters"),
        (["x\x00y"], "NUL"),
    ],
)
def test_bad_names_are_refused(names: list[str], message: str) -> None:
    with pytest.raises(ConceptError, match=message):
        validate_names(names)


def test_extend_appends_and_keeps_rows_bit_identical(tmp_path) -> None:
    base = make_table(["cat", "dog"])
    new_rows = normalise_rows(np.random.default_rng(1).normal(size=(2, 8)))
    ext = base.extended(["truck", "ship"], new_rows, "enc", "sha")
    assert ext.names == ("cat", "dog", "truck", "ship")
    assert np.array_equal(ext.vectors[:2].view(np.uint16), base.vectors.view(np.uint16))
    assert base.is_prefix_of(ext) and not ext.is_prefix_of(base)
    ext.save(tmp_path / "t.npz")
    loaded = ConceptTable.load(tmp_path / "t.npz")
    assert loaded.fingerprint == ext.fingerprint
    assert np.array_equal(loaded.vectors.view(np.uint16), ext.vectors.view(np.uint16))


def test_extend_refuses_other_encoder_and_existing_names() -> None:
    base = make_table(["cat", "dog"])
    rows = normalise_rows(np.ones((1, 8)))
    with pytest.raises(ConceptError, match="encoder mismatch"):
        base.extended(["truck"], rows, "enc", "other-sha")
    with pytest.raises(ConceptError, match="already in the table"):
        base.extended(["cat"], rows, "enc", "sha")


def test_altered_table_file_is_detected(tmp_path) -> None:
    t = make_table(["cat", "dog"])
    t.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        vectors, meta = z["vectors"].copy(), z["meta"]
    vectors[0, 0] = np.float16(0.5)
    np.savez(tmp_path / "t.npz", vectors=vectors, meta=meta)
    with pytest.raises(ConceptError, match="fingerprint"):
        ConceptTable.load(tmp_path / "t.npz")


def test_lookup_by_name_or_slug() -> None:
    t = make_table(["T-shirt/top", "Ankle boot"])
    assert t.lookup("T-shirt/top") == 0
    assert t.lookup("t-shirt-top") == 0
    assert t.lookup("ankle-boot") == 1
    assert t.lookup("sock") is None
