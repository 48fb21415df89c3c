"""Checks of a checkpoint version read back from disk: the schema of ``meta.json`` and the sha256 of
every file beside it.

A version is refused by name (file and field) with a :class:`StoreError` before any value of it
sizes an allocation, indexes a table or reaches torch: a hand-edited or corrupted store gives one
line and exit 1, never a traceback or an out-of-memory kill.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from cvm_edge.errors import StoreError
from cvm_edge.fsutil import MAX_SMALL_FILE_BYTES, MAX_STORE_FILE_BYTES, read_regular, sha256_regular
from cvm_edge.model import ModelConfig
from cvm_edge.schema import (
    MAX_IMAGE_SIZE,
    Checker,
    check_preprocessing,
    is_int,
    is_number,
    show,
    strict_json,
)

META_FILE = "meta.json"
# The files every version has; a version written by a later release may add optional ones, which are
# hashed and checked like these when they are listed in meta.json's "files".
REQUIRED_FILES = ("model.pt", "plugins.pt", "concepts.npz", "buffer.npz", "val.npz")
MAX_MAPPER_HIDDEN = 65536
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_model(c: Checker, d: Any) -> ModelConfig:
    if not isinstance(d, dict):
        raise c.fail("model", f"must be an object, got {show(d)}")
    # every known field must have its default's type (an int where an int is expected, ...)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in d:
            continue
        v, default = d[f.name], f.default
        ok = (
            isinstance(v, str)
            if isinstance(default, str)
            else is_number(v)
            if isinstance(default, float)
            else is_int(v)
            if is_int(default)
            else True
        )
        if f.name == "backbone":
            ok = isinstance(v, str) and 0 < len(v) <= 200
        if not ok:
            raise c.fail(f"model.{f.name}", f"has the wrong type: {show(v)}")
    c.int_in(d, "image_size", 8, MAX_IMAGE_SIZE, "model.image_size")
    if "mapper_hidden" in d:
        c.int_in(d, "mapper_hidden", 0, MAX_MAPPER_HIDDEN, "model.mapper_hidden")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise c.fail("model", f"is invalid ({exc})") from None


def _check_history(c: Checker, history: Any) -> None:
    if not isinstance(history, list):
        raise c.fail("history", f"must be a list, got {show(history)}")
    for i, e in enumerate(history):
        field = f"history[{i}]"
        if not isinstance(e, dict):
            raise c.fail(field, f"must be an object, got {show(e)}")
        if not is_int(e.get("task")):
            raise c.fail(f"{field}.task", f"must be an integer, got {show(e.get('task'))}")
        for key in ("trained_classes", "new_classes"):
            if key in e:
                c.int_list(e, key)
        if "trained_classes" not in e and "new_classes" not in e:
            raise c.fail(field, "names no trained classes")
        for key in ("new_class_names", "revisited_class_names"):
            if key in e:
                c.str_list(e, key)
        acc = e.get("per_class_accuracy")
        if not isinstance(acc, dict) or not all(
            isinstance(k, str) and k.isdigit() and is_number(v) for k, v in acc.items()
        ):
            raise c.fail(f"{field}.per_class_accuracy", "must map class rows to finite numbers")


def check_meta(meta: Any, where: str, version: int) -> dict[str, Any]:
    """``meta`` (parsed ``meta.json`` of ``version``) when its schema holds, else :class:`StoreError`."""
    c = Checker(where, StoreError)
    if not isinstance(meta, dict):
        raise c.fail("the document", f"must be an object, got {show(meta)}")
    if meta.get("format") != 1:
        raise c.fail("format", f"must be 1 (what this runtime reads), got {show(meta.get('format'))}")
    if meta.get("version") != version or not is_int(meta.get("version")):
        raise c.fail("version", f"must be {version} (the folder's version), got {show(meta.get('version'))}")
    parent = meta.get("parent")
    if parent is not None and (not is_int(parent) or not 1 <= parent < version):
        raise c.fail("parent", f"must be null or an earlier version, got {show(parent)}")
    if "created_at" in meta:
        c.of_type(meta, "created_at", str, "a string")
    model = _check_model(c, meta.get("model"))
    prep = check_preprocessing(c, meta.get("preprocessing"))
    if model.image_size != prep.image_size:
        raise c.fail(
            "model.image_size", f"({model.image_size}) differs from preprocessing.image_size ({prep.image_size})"
        )
    fingerprint = meta.get("table_fingerprint")
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16}", fingerprint):
        raise c.fail("table_fingerprint", f"must be 16 hex digits, got {show(fingerprint)}")
    seen = c.int_list(meta, "seen")
    if len(set(seen)) != len(seen):
        raise c.fail("seen", "lists a class row twice")
    names = c.str_list(meta, "seen_names")
    if len(names) != len(seen):
        raise c.fail("seen_names", f"has {len(names)} entries for {len(seen)} seen classes")
    if "plugins" in meta:
        c.str_list(meta, "plugins", limit=32)
    if "keep_versions" in meta:
        c.int_in(meta, "keep_versions", 0, 999_999)
    _check_history(c, meta.get("history"))
    if "backbone_graph" in meta and not (
        isinstance(meta["backbone_graph"], str) and SHA256_RE.match(meta["backbone_graph"])
    ):
        raise c.fail("backbone_graph", f"must be a sha256 hex digest, got {show(meta['backbone_graph'])}")
    if "files" in meta:
        files = meta["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str)
            and "/" not in k
            and k not in ("", ".", "..", META_FILE)
            and isinstance(v, str)
            and SHA256_RE.match(v)
            for k, v in files.items()
        ):
            raise c.fail("files", "must map file names of this folder to sha256 hex digests")
    return meta


def read_meta_file(path: Path, version: int) -> dict[str, Any]:
    """Read and check one version's ``meta.json`` (a regular file of bounded size)."""
    try:
        raw = read_regular(path, MAX_SMALL_FILE_BYTES)
        meta = strict_json(raw)
    except OSError as exc:
        raise StoreError(f"{path}: unreadable ({exc.strerror or exc}); refusing to use it") from None
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{path}: not valid JSON ({str(exc)[:80]}); the file was altered or damaged") from None
    return check_meta(meta, str(path), version)


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a version folder being written (all but ``meta.json``, which holds them)."""
    return {p.name: sha256_regular(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != META_FILE}


def verify_files(folder: Path, meta: dict[str, Any]) -> None:
    """Every file of the version is a regular file within bounds and, where ``meta.json`` records a
    sha256 (versions written since it does), matches it. Versions from before record none: their
    files are only checked to be regular files."""
    folder = Path(folder)
    recorded: dict[str, str] = meta.get("files", {})
    if recorded:
        missing = [f for f in REQUIRED_FILES if f not in recorded]
        if missing:
            raise StoreError(f"{folder / META_FILE}: records no sha256 of {', '.join(missing)}; refusing to use it")
    for name in sorted(set(REQUIRED_FILES) | set(recorded)):
        path = folder / name
        try:
            digest = sha256_regular(path, MAX_STORE_FILE_BYTES)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing; the version is incomplete") from None
        except OSError as exc:
            raise StoreError(f"{path}: unreadable ({exc.strerror or exc}); refusing to use it") from None
        want = recorded.get(name)
        if want is not None and digest != want:
            raise StoreError(
                f"{path}: sha256 {digest[:16]}... does not match the {want[:16]}... recorded in {META_FILE}; "
                "the file was altered or damaged, refusing to use it"
            )
