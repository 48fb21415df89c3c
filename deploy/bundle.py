"""Bundles: ``model.onnx`` + ``concepts.npz`` + ``manifest.json`` under ``<workdir>/bundles/<name>/``.

A bundle is written into a temp dir, fsynced and renamed into place (the same primitives as the
checkpoint store), and only then does the ``CURRENT`` pointer move. Readers check, before anything
loads: the sha256 of ``manifest.json`` and ``concepts.npz`` against ``manifest.sha256`` (written in
the same temp dir, so it is published atomically with them), the manifest's schema, its classes
against the concept table, and the sha256 of ``model.onnx`` against the manifest. numpy only: the
serving side never imports torch.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cvm_edge.concepts import ConceptTable, validate_names
from cvm_edge.errors import ConceptError, ModelLoadError, StoreError
from cvm_edge.fsutil import (
    MAX_MODEL_BYTES,
    MAX_SMALL_FILE_BYTES,
    atomic_write_text,
    fault_point,
    read_pointer,
    read_regular,
    sha256_regular,
    write_pointer,
)
from cvm_edge.preprocess import Preprocessing
from cvm_edge.schema import Checker, check_preprocessing, is_int, is_number, show, strict_json
from cvm_edge.workdir import Publication, layout, publish_version

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = "model.onnx"
CONCEPTS_FILE = "concepts.npz"
MANIFEST_FILE = "manifest.json"
DIGEST_FILE = "manifest.sha256"  # sha256sum format: the manifest and the concept table it names
SEALED_FILES = (MANIFEST_FILE, CONCEPTS_FILE)
POINTER = "CURRENT"
PRECISIONS = ("fp32", "fp16", "int8")
# v000003 (fp32), v000003-int8, and a revision suffix when the same version is exported again: v000003-int8.2
NAME_RE = re.compile(r"^v(\d{6})(?:-(fp16|int8))?(?:\.(\d+))?$")
REQUIRED_KEYS = ("format", "name", "version", "precision", "opset", "preprocessing", "classes", "model_sha256")


def bundles_root(workdir: Path) -> Path:
    return layout(workdir).bundles


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


def int8_weights_of(manifest: Mapping[str, Any]) -> str | None:
    """An int8 bundle's weight kind as its export recorded it (``parity.calibration.weights``:
    "int8" for U8S8, "uint8" for U8U8, deploy/cpu.py); None when absent (other precisions, and int8
    bundles exported before the kind was recorded) or not one of the two."""
    parity = manifest.get("parity")
    calibration = parity.get("calibration") if isinstance(parity, Mapping) else None
    weights = calibration.get("weights") if isinstance(calibration, Mapping) else None
    return weights if weights in ("int8", "uint8") else None


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

    @property
    def int8_weights(self) -> str | None:
        return int8_weights_of(self.manifest)

    def read_verified_model(self) -> bytes:
        """The bytes of ``model.onnx`` after checking them against the manifest's sha256.

        The same bytes are handed to onnxruntime, so what was verified is what runs. Only a regular
        file of the manifest's ``model_bytes`` (at most 2 GiB) is read: a FIFO or a link to
        ``/dev/zero`` is refused without blocking or filling memory."""
        path = self.path / MODEL_FILE
        limit = int(self.manifest.get("model_bytes") or MAX_MODEL_BYTES)
        try:
            data = read_regular(path, limit)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EFBIG:  # longer than the model that was hashed
                why += " (the manifest's model_bytes), so its sha256 cannot match"
            raise ModelLoadError(
                f"bundle {self.path.name}: cannot read {MODEL_FILE}: {why}; refusing to load it"
            ) from None
        digest = sha256_bytes(data)
        if digest != self.manifest["model_sha256"]:
            raise ModelLoadError(
                f"bundle {self.path.name}: {MODEL_FILE} sha256 {digest[:16]}... does not match the manifest "
                f"({str(self.manifest['model_sha256'])[:16]}...); refusing to load it"
            )
        return data


def digest_text(folder: Path) -> str:
    """``manifest.sha256``'s content for the sealed files of ``folder`` (sha256sum's format)."""
    return "".join(f"{sha256_regular(Path(folder) / name, MAX_MODEL_BYTES)}  {name}\n" for name in SEALED_FILES)


def seal_bundle(folder: Path) -> None:
    """(Re)write ``manifest.sha256`` for the manifest and concept table now in ``folder``.
    ``publish_bundle`` does this in its temp dir; anyone who edits a bundle by hand must do it again."""
    atomic_write_text(Path(folder) / DIGEST_FILE, digest_text(folder))


def _check_seal(path: Path) -> bytes:
    """The bytes of ``manifest.json`` once it and ``concepts.npz`` match ``manifest.sha256``."""
    try:
        manifest_bytes = read_regular(path / MANIFEST_FILE, MAX_SMALL_FILE_BYTES)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a bundle (no {MANIFEST_FILE})") from None
    except OSError as exc:
        raise ModelLoadError(f"bundle {path.name}: unreadable {MANIFEST_FILE}: {exc.strerror or exc}") from None
    try:
        lines = read_regular(path / DIGEST_FILE, 4096).decode("ascii").splitlines()
        recorded = {name: digest for digest, _, name in (line.partition("  ") for line in lines)}
    except FileNotFoundError:
        raise ModelLoadError(
            f"bundle {path.name} has no {DIGEST_FILE} (its {MANIFEST_FILE} is not covered by a sha256; bundles "
            "exported before it existed must be exported again with `cvm export`); refusing to load it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"bundle {path.name}: unreadable {DIGEST_FILE}: {exc}") from None
    for name in SEALED_FILES:
        try:
            actual = sha256_bytes(manifest_bytes) if name == MANIFEST_FILE else sha256_regular(path / name)
        except OSError as exc:
            raise ModelLoadError(f"bundle {path.name}: cannot read {name}: {exc.strerror or exc}") from None
        if recorded.get(name) != actual:
            raise ModelLoadError(
                f"bundle {path.name}: {name} sha256 {actual[:16]}... does not match {DIGEST_FILE} "
                f"({str(recorded.get(name, 'none'))[:16]}...); the file was altered, refusing to load it"
            )
    return manifest_bytes


def _shape_ok(v: Any) -> bool:
    return isinstance(v, list) and 0 < len(v) <= 8 and all(is_int(d) and d >= -1 for d in v)


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` when every field the runtime or ``/v1/model`` uses has its type and a sane value."""
    c = Checker(f"bundle {path.name}: {MANIFEST_FILE}", ModelLoadError)
    if not isinstance(manifest, dict):
        raise c.fail("the document", f"must be an object, got {show(manifest)}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelLoadError(f"bundle {path.name}: manifest lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ModelLoadError(f"bundle {path.name}: manifest format {manifest['format']!r}, this runtime reads {FORMAT}")
    if not isinstance(manifest["name"], str) or not NAME_RE.match(manifest["name"]):
        raise c.fail("name", f"must be a bundle name such as v000003-int8, got {show(manifest['name'])}")
    c.int_in(manifest, "version", 1, 999_999)
    if manifest["precision"] not in PRECISIONS:
        raise c.fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {show(manifest['precision'])}")
    c.int_in(manifest, "opset", 1, 1000)
    prep = check_preprocessing(c, manifest["preprocessing"])
    if "image_size" in manifest and manifest["image_size"] != prep.image_size:
        raise c.fail("image_size", "differs from preprocessing.image_size")
    if not isinstance(manifest["model_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", manifest["model_sha256"]):
        raise c.fail("model_sha256", f"must be 64 hex digits, got {show(manifest['model_sha256'])}")
    if "model_bytes" in manifest:
        c.int_in(manifest, "model_bytes", 1, MAX_MODEL_BYTES)
    classes = c.str_list(manifest, "classes")
    if not classes:
        raise ModelLoadError(f"bundle {path.name}: manifest lists no classes")
    try:
        validate_names(classes)  # the rules every concept table's names follow
    except ConceptError as exc:
        raise c.fail("classes", f"hold a name no concept table can have ({exc})") from None
    if "class_rows" in manifest:
        rows = c.int_list(manifest, "class_rows")
        if len(rows) != len(classes):
            raise c.fail("class_rows", f"has {len(rows)} entries for {len(classes)} classes")
    for key in ("input", *(["outputs"] if "outputs" in manifest else [])):
        items = manifest.get(key) if key == "outputs" else [manifest.get(key, {"shape": [-1]})]
        if not isinstance(items, list) or not all(isinstance(o, dict) and _shape_ok(o.get("shape")) for o in items):
            raise c.fail(key, "must hold objects with a shape (a list of integers >= -1)")
    if "outputs" in manifest and len(manifest["outputs"]) < 2:
        raise c.fail("outputs", "must list logits and embedding")
    if manifest.get("logit_scale") is not None and not is_number(manifest["logit_scale"]):
        raise c.fail("logit_scale", f"must be null or a finite number, got {show(manifest['logit_scale'])}")
    for key in ("table_fingerprint", "head", "exporter", "created_at", "checkpoint_created_at", "table_encoder"):
        if key in manifest and not isinstance(manifest[key], str):
            raise c.fail(key, f"must be a string, got {show(manifest[key])}")
    return manifest


def _check_classes_against_table(manifest: dict[str, Any], path: Path) -> None:
    """The labels served are names of the (sealed) concept table, at the rows the manifest says."""
    if "class_rows" not in manifest:
        return
    try:
        table = ConceptTable.load(path / CONCEPTS_FILE)
    except ConceptError as exc:
        raise ModelLoadError(f"bundle {path.name}: {exc}") from None
    rows = manifest["class_rows"]
    if any(r >= len(table) for r in rows) or [table.names[r] for r in rows] != manifest["classes"]:
        raise ModelLoadError(
            f"bundle {path.name}: {MANIFEST_FILE} classes are not the names of {CONCEPTS_FILE} at its class_rows; "
            "refusing to load it"
        )
    if "table_fingerprint" in manifest and manifest["table_fingerprint"] != table.fingerprint:
        raise ModelLoadError(f"bundle {path.name}: {MANIFEST_FILE} table_fingerprint does not match {CONCEPTS_FILE}")


def load_bundle(path: Path) -> Bundle:
    """Check and parse a bundle directory's ``manifest.json`` (raises :class:`ModelLoadError`): its
    seal first, then its schema, then its classes against the concept table."""
    path = Path(path)
    raw = _check_seal(path)
    try:
        manifest = strict_json(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"bundle {path.name}: unreadable {MANIFEST_FILE}: {str(exc)[:100]}") from None
    _check_classes_against_table(check_manifest(manifest, path), path)
    return Bundle(path, manifest)


def verify_bundle(workdir: Path, name: str) -> Bundle:
    """Everything a server checks before it serves bundle ``name``, without loading the model: used
    before a pointer is moved to it (raises :class:`ModelLoadError`)."""
    if not NAME_RE.match(name) or not (bundles_root(workdir) / name / MANIFEST_FILE).is_file():
        raise StoreError(f"no complete bundle named {name[:60]!r}")
    bundle = load_bundle(bundles_root(workdir) / name)
    bundle.read_verified_model()
    return bundle


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
    """Write a bundle and publish it as ``root/name`` (:func:`cvm_edge.workdir.publish_version`),
    then move ``CURRENT``. The manifest and its digest are written last: a directory without them
    is never a bundle. Call while holding the store lock."""
    if not NAME_RE.match(name):
        raise ValueError(f"bad bundle name {name!r}")
    pub = Publication(
        parent=root,
        name=name,
        pointer=root / POINTER,
        what=f"bundle {name}",
        keeps="the server keeps {}",
        unnamed="what it serves",
        pointer_fault="before_bundle_pointer",
    )

    def write(tmp: Path) -> None:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        fault_point("bundle_files_written")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / DIGEST_FILE).write_text(digest_text(tmp), encoding="ascii")  # renamed into place with the rest

    final = publish_version(pub, write)
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
    verify_bundle(workdir, name)  # refuse to point at something that does not verify, model.onnx included
    write_pointer(bundles_root(workdir) / POINTER, name)
