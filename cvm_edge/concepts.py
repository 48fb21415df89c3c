"""The concept table: one fixed, L2-normalised language-model vector per class, append-only.

Row ``i`` means the same class forever; ``extend`` only appends. Needs numpy only, so the server
and the device runtime can read tables without the language model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvm_edge.errors import ConceptError
from cvm_edge.fsutil import atomic_write_bytes

FORMAT_VERSION = 1
SIMILAR_WARN_COSINE = 0.9


def slugify(name: str) -> str:
    """The safe folder name of a class: lower case, runs of other characters become one '-'.

    "T-shirt/top" -> "t-shirt-top", "Ankle boot" -> "ankle-boot".
    """
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


def _fingerprint(names: Sequence[str], vectors: np.ndarray, encoder_id: str) -> str:
    h = hashlib.sha256()
    h.update(encoder_id.encode())
    h.update(json.dumps(list(names)).encode())
    h.update(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ConceptTable:
    """Class names and their fixed unit vectors (float16), plus where they came from."""

    names: tuple[str, ...]
    vectors: np.ndarray  # float16 [C, D], rows L2-normalised
    encoder_id: str
    encoder_sha256: str
    templates: tuple[str, ...]
    created_at: str
    descriptions: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        validate_names(self.names)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.names):
            raise ConceptError(f"table has {len(self.names)} names but vectors of shape {tuple(self.vectors.shape)}")
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
        return _fingerprint(self.names, self.vectors, self.encoder_id)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConceptError(f"class {name!r} is not in the concept table") from None

    def lookup(self, name_or_slug: str) -> int | None:
        """Row of a class given its exact name or its slug; None when absent."""
        if name_or_slug in self.names:
            return self.names.index(name_or_slug)
        slugs = [slugify(n) for n in self.names]
        key = slugify(name_or_slug)
        return slugs.index(key) if key in slugs else None

    def as_float32(self) -> np.ndarray:
        return self.vectors.astype(np.float32)

    def similar_pairs(self, threshold: float = SIMILAR_WARN_COSINE) -> list[tuple[str, str, float]]:
        """Class pairs whose vectors are nearly the same direction (hard to tell apart)."""
        v = self.as_float32()
        sims = v @ v.T
        out = []
        for i in range(len(self.names)):
            for j in range(i + 1, len(self.names)):
                if sims[i, j] > threshold:
                    out.append((self.names[i], self.names[j], float(sims[i, j])))
        return out

    def is_prefix_of(self, other: ConceptTable) -> bool:
        """True when ``other`` starts with exactly this table's rows (same encoder, bit-identical)."""
        n = len(self)
        return (
            self.encoder_id == other.encoder_id
            and self.encoder_sha256 == other.encoder_sha256
            and other.names[:n] == self.names
            and other.vectors.shape[1] == self.dim
            and np.array_equal(other.vectors[:n].view(np.uint16), self.vectors.view(np.uint16))
        )

    def extended(
        self,
        names: Sequence[str],
        vectors: np.ndarray,
        encoder_id: str,
        encoder_sha256: str,
        descriptions: Sequence[Sequence[str]] | None = None,
    ) -> ConceptTable:
        """A new table with rows appended; existing rows are kept bit for bit."""
        if encoder_id != self.encoder_id or encoder_sha256 != self.encoder_sha256:
            raise ConceptError(
                f"encoder mismatch: table was built with {self.encoder_id} (sha256 {self.encoder_sha256[:12]}), "
                f"new rows with {encoder_id} (sha256 {encoder_sha256[:12]})"
            )
        clash = [n for n in names if n in self.names]
        if clash:
            raise ConceptError(f"classes already in the table: {', '.join(clash)}")
        new = np.asarray(vectors)
        if new.ndim != 2 or new.shape != (len(names), self.dim):
            raise ConceptError(f"new vectors have shape {new.shape}, expected ({len(names)}, {self.dim})")
        old_desc = self.descriptions or tuple(() for _ in self.names)
        new_desc = tuple(tuple(d) for d in descriptions) if descriptions else tuple(() for _ in names)
        all_desc = old_desc + new_desc
        return dataclasses.replace(
            self,
            names=self.names + tuple(names),
            vectors=np.concatenate([self.vectors, new.astype(np.float16)], axis=0),
            descriptions=all_desc if any(all_desc) else (),
        )

    def meta(self) -> dict[str, object]:
        return {
            "format": FORMAT_VERSION,
            "names": list(self.names),
            "encoder_id": self.encoder_id,
            "encoder_sha256": self.encoder_sha256,
            "templates": list(self.templates),
            "created_at": self.created_at,
            "descriptions": [list(d) for d in self.descriptions],
            "dim": self.dim,
            "fingerprint": self.fingerprint,
        }

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
            with np.load(path, allow_pickle=False) as z:
                vectors = z["vectors"]
                meta = json.loads(str(z["meta"]))
        except FileNotFoundError:
            raise ConceptError(f"concept table {path} does not exist") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ConceptError(f"{path} is not a concept table: {exc}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise ConceptError(f"{path}: unsupported table format {meta.get('format')!r}")
        table = cls(
            names=tuple(meta["names"]),
            vectors=vectors,
            encoder_id=meta["encoder_id"],
            encoder_sha256=meta["encoder_sha256"],
            templates=tuple(meta["templates"]),
            created_at=meta["created_at"],
            descriptions=tuple(tuple(d) for d in meta.get("descriptions", [])),
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
