from __future__ import annotations

import dataclasses

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


# ----- multi-prototype tables ------------------------------------------------------------------
def make_multi(names: list[str], prototypes: list[tuple[str, ...]], dim: int = 8, seed: int = 0) -> ConceptTable:
    rows = len(names) + sum(len(p) for p in prototypes)
    v = normalise_rows(np.random.default_rng(seed).normal(size=(rows, dim)))
    return ConceptTable(
        tuple(names),
        v.astype(np.float16),
        "enc",
        "sha",
        ("a photo of a {}.",),
        "2026-01-01",
        prototypes=tuple(prototypes),
    )


def test_single_prototype_table_fingerprint_is_unchanged_from_format_1() -> None:
    import hashlib
    import json

    t = make_table(["cat", "dog"])
    # the format-1 recipe, written out here so a change to it cannot go unnoticed
    h = hashlib.sha256(b"enc" + json.dumps(["cat", "dog"]).encode() + t.vectors.tobytes()).hexdigest()[:16]
    assert t.fingerprint == h and t.meta()["format"] == 1 and "prototypes" not in t.meta()
    assert t.prototype_counts == (1, 1) and not t.is_multi_prototype
    assert np.array_equal(t.as_float32(), t.vectors.astype(np.float32))


def test_multi_prototype_rows_padding_and_round_trip(tmp_path) -> None:
    t = make_multi(["cat", "dog", "ship"], [("a purring pet", "a kitten"), (), ("a boat",)])
    assert t.prototype_counts == (3, 1, 2) and len(t.vectors) == 6
    assert t.class_rows(2) == slice(4, 6)
    head = t.as_float32()
    assert head.shape == (3, 3, 8)
    assert np.array_equal(head[0], t.vectors[0:3].astype(np.float32))
    assert np.array_equal(head[1, 0], t.vectors[3].astype(np.float32)) and not head[1, 1:].any()
    assert np.array_equal(t.name_vectors(), t.vectors[[0, 3, 4]].astype(np.float32))
    t.save(tmp_path / "t.npz")
    loaded = ConceptTable.load(tmp_path / "t.npz")
    assert loaded.prototypes == t.prototypes and loaded.fingerprint == t.fingerprint
    assert loaded.meta()["format"] == 2


def test_multi_prototype_extend_keeps_every_prototype_and_prefix_covers_them() -> None:
    base = make_multi(["cat", "dog"], [("a purring pet",), ()])
    rows = normalise_rows(np.random.default_rng(3).normal(size=(3, 8)))
    ext = base.extended(["ship", "truck"], rows, "enc", "sha", prototypes=[("a boat",), ()])
    assert ext.names == ("cat", "dog", "ship", "truck") and ext.prototype_counts == (2, 1, 2, 1)
    assert np.array_equal(ext.vectors[:3].view(np.uint16), base.vectors.view(np.uint16))
    assert base.is_prefix_of(ext)
    # same names and rows, but a prototype that now means something else: not an extension
    relabelled = dataclasses.replace(ext, prototypes=(("a small cat",), (), ("a boat",), ()))
    assert not base.is_prefix_of(relabelled) and relabelled.fingerprint != ext.fingerprint
    # a single-prototype table is a prefix of its extension by classes with descriptions
    plain = make_table(["cat", "dog"])
    ext2 = plain.extended(["ship"], normalise_rows(np.ones((2, 8))), "enc", "sha", prototypes=[("a boat",)])
    assert plain.is_prefix_of(ext2) and ext2.prototype_counts == (1, 1, 2)
    with pytest.raises(ConceptError, match="expected \\(3, 8\\)"):
        base.extended(["ship"], normalise_rows(np.ones((1, 8))), "enc", "sha", prototypes=[("a boat", "a ferry")])


@pytest.mark.parametrize(
    "prototypes, message",
    [
        ([("a", "a"), ()], "same description twice"),
        ([(" a",), ()], "non-empty, stripped"),
        ([("a",)], "one entry per class"),
    ],
)
def test_bad_prototypes_are_refused(prototypes: list[tuple[str, ...]], message: str) -> None:
    with pytest.raises(ConceptError, match=message):
        ConceptTable(("cat", "dog"), np.ones((3, 8), np.float16), "enc", "sha", (), "x", prototypes=tuple(prototypes))


def test_altered_prototype_text_is_detected(tmp_path) -> None:
    import json

    t = make_multi(["cat", "dog"], [("a purring pet",), ()])
    t.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        vectors, meta = z["vectors"].copy(), json.loads(str(z["meta"]))
    meta["prototypes"] = [["a barking pet"], []]
    np.savez(tmp_path / "t.npz", vectors=vectors, meta=np.array(json.dumps(meta)))
    with pytest.raises(ConceptError, match="fingerprint"):
        ConceptTable.load(tmp_path / "t.npz")
