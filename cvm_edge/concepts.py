"""The concept table: fixed, L2-normalised language-model vectors per class, append-only.

Class ``i`` means the same class forever; ``extend`` only appends. A class has one prototype row
(its name through the prompt ensemble) and, in a multi-prototype table, one more row per
description (MuproCL-style); rows are stored class by class, so appending classes appends rows
and never moves existing ones. Needs numpy only, so the server and the device runtime can read
tables without the language model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvm_edge.errors import ConceptError
from cvm_edge.fsutil import atomic_write_bytes

FORMAT_VERSION = 1  # one row per class; still written for such tables, so older readers keep working
MULTI_PROTOTYPE_FORMAT = 2  # adds "prototypes": the description texts of each class's extra rows
READABLE_FORMATS = (FORMAT_VERSION, MULTI_PROTOTYPE_FORMAT)
SIMILAR_WARN_COSINE = 0.9
MAX_PROTOTYPES_PER_CLASS = 32
MAX_DESCRIPTION_CHARS = 500


# Longest slug in UTF-8 bytes: a folder name must fit NAME_MAX (255 bytes on every Linux filesystem).
MAX_SLUG_BYTES = 240


def _slug_char(ch: str) -> bool:
    if ch.isascii():
        return ch.isalnum()
    # letters, combining marks (Arabic, Devanagari vowel signs) and digits of every script
    return unicodedata.category(ch)[0] in "LMN"


def slugify(name: str) -> str:
    """The safe folder name of a class: NFKC-normalised, lower case, letters, marks and digits of
    any script kept, runs of anything else (``/``, ``.``, spaces, controls) become one '-'.

    "T-shirt/top" -> "t-shirt-top", "Ankle boot" -> "ankle-boot", "Пуловер" -> "пуловер",
    "猫" -> "猫". The result never holds a path separator, a dot or a control character, so it is
    always one safe path component (at most ``MAX_SLUG_BYTES`` bytes of UTF-8)."""
    text = unicodedata.normalize("NFKC", name).lower()
    slug = "".join(ch if _slug_char(ch) else "-" for ch in text)
    slug = re.sub(r"-+", "-", slug).strip("-")
    while len(slug.encode("utf-8")) > MAX_SLUG_BYTES:
        slug = slug[:-1].rstrip("-")
    return slug


def _ascii_slug(name: str) -> str:
    """The slug of releases before non-Latin names were accepted ("Café" -> "caf"): data folders
    named that way by those releases still match."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def validate_names(names: Sequence[str]) -> None:
    """Refuse empty, duplicate or slug-colliding names (slugs name data folders)."""
    if not names:
        raise ConceptError("no class names given")
    seen: dict[str, str] = {}
    for name in names:
        if not name.strip():
            raise ConceptError("empty class name")
        if name != name.strip():
            raise ConceptError(f"class name {name!r} has leading or trailing spaces")
        if "\x00" in name or len(name) > 200:
            raise ConceptError(f"class name {name[:40]!r}... is not allowed (NUL byte or over 200 characters)")
        slug = slugify(name)
        if not slug:
            raise ConceptError(f"class name {name!r} has no letters or digits")
        if slug in seen:
            other = seen[slug]
            if other == name:
                raise ConceptError(f"duplicate class name {name!r}")
            raise ConceptError(f"class names {other!r} and {name!r} share the folder slug {slug!r}")
        seen[slug] = name


def validate_prototypes(names: Sequence[str], prototypes: Sequence[Sequence[str]]) -> None:
    """Description texts of the extra prototype rows: one (possibly empty) list per class."""
    if len(prototypes) != len(names):
        raise ConceptError(f"prototypes must have one entry per class ({len(names)}), got {len(prototypes)}")
    for name, texts in zip(names, prototypes, strict=True):
        if len(texts) > MAX_PROTOTYPES_PER_CLASS:
            raise ConceptError(f"class {name!r} has {len(texts)} descriptions, at most {MAX_PROTOTYPES_PER_CLASS}")
        if len(set(texts)) != len(texts):
            raise ConceptError(f"class {name!r} has the same description twice")
        for t in texts:
            if not isinstance(t, str) or not t.strip() or t != t.strip() or len(t) > MAX_DESCRIPTION_CHARS:
                raise ConceptError(
                    f"description {str(t)[:40]!r} of class {name!r} must be a non-empty, stripped string of at most "
                    f"{MAX_DESCRIPTION_CHARS} characters"
                )


def _fingerprint(
    names: Sequence[str], vectors: np.ndarray, encoder_id: str, prototypes: Sequence[Sequence[str]] = ()
) -> str:
    h = hashlib.sha256()
    h.update(encoder_id.encode())
    h.update(json.dumps(list(names)).encode())
    h.update(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
    # Single-prototype tables hash exactly as before, so stores and bundles made by earlier versions
    # still verify; with extra rows, which class owns which row (and from what text) is hashed too.
    if any(prototypes):
        h.update(b"\x00prototypes")
        h.update(json.dumps([list(p) for p in prototypes]).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ConceptTable:
    """Class names and their fixed unit vectors (float16), plus where they came from.

    ``vectors`` holds every prototype row, class by class: class ``i`` owns
    ``prototype_counts[i]`` consecutive rows, the first of which is its name through the prompt
    ensemble (plus its ``descriptions``, averaged in), the others one per ``prototypes[i]`` text.
    ``prototypes == ()`` is a single-prototype table (row ``i`` is class ``i``, as before)."""

    names: tuple[str, ...]
    vectors: np.ndarray  # float16 [R, D] (R = sum of prototype_counts), rows L2-normalised
    encoder_id: str
    encoder_sha256: str
    templates: tuple[str, ...]
    created_at: str
    descriptions: tuple[tuple[str, ...], ...] = ()  # extra prompts averaged into each class's name row
    prototypes: tuple[tuple[str, ...], ...] = ()  # texts of each class's extra rows; () = one row per class

    def __post_init__(self) -> None:
        validate_names(self.names)
        if self.prototypes:
            validate_prototypes(self.names, self.prototypes)
            if not any(self.prototypes):  # one canonical form per table, so equal tables compare and hash equal
                object.__setattr__(self, "prototypes", ())
        rows = sum(self.prototype_counts)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != rows:
            raise ConceptError(
                f"table has {len(self.names)} classes with {rows} prototype rows but vectors of shape "
                f"{tuple(self.vectors.shape)}"
            )
        if self.vectors.dtype != np.float16:
            raise ConceptError(f"table vectors must be float16, got {self.vectors.dtype}")
        if not np.all(np.isfinite(self.vectors)):
            raise ConceptError("table vectors contain NaN or infinity")
        if self.descriptions and len(self.descriptions) != len(self.names):
            raise ConceptError("descriptions must have one entry per class")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.names, self.vectors, self.encoder_id, self.prototypes)

    @property
    def prototype_counts(self) -> tuple[int, ...]:
        """Rows per class (>= 1 each)."""
        if not self.prototypes:
            return (1,) * len(self.names)
        return tuple(1 + len(p) for p in self.prototypes)

    @property
    def is_multi_prototype(self) -> bool:
        return bool(self.prototypes)

    def class_rows(self, i: int) -> slice:
        """The rows of ``vectors`` that belong to class ``i``."""
        counts = self.prototype_counts
        start = sum(counts[:i])
        return slice(start, start + counts[i])

    def name_vectors(self) -> np.ndarray:
        """float32 [C, D]: each class's first row (its name through the prompt ensemble)."""
        starts = np.concatenate([[0], np.cumsum(self.prototype_counts)[:-1]]).astype(np.int64)
        return self.vectors[starts].astype(np.float32)

    def lookup(self, name_or_slug: str) -> int | None:
        """Row of a class given its exact name or its slug; None when absent."""
        if name_or_slug in self.names:
            return self.names.index(name_or_slug)
        for slug in (slugify, _ascii_slug):
            slugs = [slug(n) for n in self.names]
            key = slug(name_or_slug)
            if key and key in slugs:
                return slugs.index(key)
        return None

    def as_float32(self) -> np.ndarray:
        """The table as the model's head takes it: float32 ``[C, D]`` for a single-prototype table
        (exactly the stored rows); ``[C, P, D]`` for a multi-prototype one, where ``P`` is the most
        rows any class has and a class with fewer is padded with all-zero rows (a real row is never
        zero: it is unit-norm). A fixed dense shape keeps the head free of data-dependent shapes."""
        if not self.prototypes:
            return self.vectors.astype(np.float32)
        counts = self.prototype_counts
        out = np.zeros((len(self.names), max(counts), self.dim), np.float32)
        for i, n in enumerate(counts):
            out[i, :n] = self.vectors[self.class_rows(i)]
        return out

    def similar_pairs(self, threshold: float = SIMILAR_WARN_COSINE) -> list[tuple[str, str, float]]:
        """Class pairs whose name vectors are nearly the same direction (hard to tell apart)."""
        v = self.name_vectors()
        sims = v @ v.T
        out = []
        for i in range(len(self.names)):
            for j in range(i + 1, len(self.names)):
                if sims[i, j] > threshold:
                    out.append((self.names[i], self.names[j], float(sims[i, j])))
        return out

    def _prototypes_or_empty(self) -> tuple[tuple[str, ...], ...]:
        return self.prototypes or tuple(() for _ in self.names)

    def is_prefix_of(self, other: ConceptTable) -> bool:
        """True when ``other`` starts with exactly this table's classes, each with the same
        prototypes (same texts, same rows bit for bit, same encoder)."""
        n, rows = len(self), len(self.vectors)
        return (
            self.encoder_id == other.encoder_id
            and self.encoder_sha256 == other.encoder_sha256
            and other.names[:n] == self.names
            and other._prototypes_or_empty()[:n] == self._prototypes_or_empty()
            and other.vectors.shape[1] == self.dim
            and np.array_equal(other.vectors[:rows].view(np.uint16), self.vectors.view(np.uint16))
        )

    def extended(
        self,
        names: Sequence[str],
        vectors: np.ndarray,
        encoder_id: str,
        encoder_sha256: str,
        descriptions: Sequence[Sequence[str]] | None = None,
        prototypes: Sequence[Sequence[str]] | None = None,
    ) -> ConceptTable:
        """A new table with classes appended; existing classes and their rows are kept bit for bit.

        ``vectors`` holds the new classes' rows class by class: a name row, then one row per
        ``prototypes[i]`` text (none when ``prototypes`` is None)."""
        if encoder_id != self.encoder_id or encoder_sha256 != self.encoder_sha256:
            raise ConceptError(
                f"encoder mismatch: table was built with {self.encoder_id} (sha256 {self.encoder_sha256[:12]}), "
                f"new rows with {encoder_id} (sha256 {encoder_sha256[:12]})"
            )
        clash = [n for n in names if n in self.names]
        if clash:
            raise ConceptError(f"classes already in the table: {', '.join(clash)}")
        new_protos = tuple(tuple(p) for p in prototypes) if prototypes else tuple(() for _ in names)
        rows = len(names) + sum(len(p) for p in new_protos)
        new = np.asarray(vectors)
        if new.ndim != 2 or new.shape != (rows, self.dim):
            raise ConceptError(f"new vectors have shape {new.shape}, expected ({rows}, {self.dim})")
        old_desc = self.descriptions or tuple(() for _ in self.names)
        new_desc = tuple(tuple(d) for d in descriptions) if descriptions else tuple(() for _ in names)
        all_desc = old_desc + new_desc
        all_protos = self._prototypes_or_empty() + new_protos
        return dataclasses.replace(
            self,
            names=self.names + tuple(names),
            vectors=np.concatenate([self.vectors, new.astype(np.float16)], axis=0),
            descriptions=all_desc if any(all_desc) else (),
            prototypes=all_protos if any(all_protos) else (),
        )

    def meta(self) -> dict[str, object]:
        meta: dict[str, object] = {
            "format": MULTI_PROTOTYPE_FORMAT if self.prototypes else FORMAT_VERSION,
            "names": list(self.names),
            "encoder_id": self.encoder_id,
            "encoder_sha256": self.encoder_sha256,
            "templates": list(self.templates),
            "created_at": self.created_at,
            "descriptions": [list(d) for d in self.descriptions],
            "dim": self.dim,
            "fingerprint": self.fingerprint,
        }
        if self.prototypes:
            meta["prototypes"] = [list(p) for p in self.prototypes]
        return meta

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors, meta=np.array(json.dumps(self.meta())))
        return buf.getvalue()

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> ConceptTable:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConceptError(f"concept table {path} does not exist") from None
        except OSError as exc:
            raise ConceptError(f"{path} is not a concept table: {exc}") from None
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "the concept table") -> ConceptTable:
        """Parse and verify a table (its fingerprint must match its contents)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                vectors = z["vectors"]
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ConceptError(f"{path} is not a concept table: {exc}") from None
        if meta.get("format") not in READABLE_FORMATS:
            raise ConceptError(f"{path}: unsupported table format {meta.get('format')!r}")
        table = cls(
            names=tuple(meta["names"]),
            vectors=vectors,
            encoder_id=meta["encoder_id"],
            encoder_sha256=meta["encoder_sha256"],
            templates=tuple(meta["templates"]),
            created_at=meta["created_at"],
            descriptions=tuple(tuple(d) for d in meta.get("descriptions", [])),
            prototypes=tuple(tuple(p) for p in meta.get("prototypes", [])),
        )
        if meta.get("fingerprint") != table.fingerprint:
            raise ConceptError(f"{path}: fingerprint mismatch, the file was altered")
        return table


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise each row; all-zero rows are an error (an encoder gave nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ConceptError("an embedding is all zeros")
    return x / norms
