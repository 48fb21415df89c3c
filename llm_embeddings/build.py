"""Build and extend concept tables from class files."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import numpy as np

from cvm_edge.concepts import ConceptTable, normalise_rows
from cvm_edge.errors import ConceptError
from llm_embeddings.classfile import ClassSpec
from llm_embeddings.encoder import Encoder

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "{}",
)


def _prompts(spec: ClassSpec, templates: Sequence[str]) -> list[str]:
    return [t.format(spec.name) for t in templates] + list(spec.descriptions)


def embed_classes(specs: Sequence[ClassSpec], encoder: Encoder, templates: Sequence[str]) -> np.ndarray:
    """Prompt ensemble: every prompt unit-normalised, averaged per class, renormalised."""
    for t in templates:
        if "{}" not in t:
            raise ConceptError(f"template {t!r} has no '{{}}' placeholder for the class name")
    prompts = [_prompts(s, templates) for s in specs]
    flat = [p for group in prompts for p in group]
    emb = encoder.encode(flat)
    rows, start = [], 0
    for group in prompts:
        rows.append(emb[start : start + len(group)].mean(axis=0))
        start += len(group)
    return normalise_rows(np.stack(rows))


def build_table(
    specs: Sequence[ClassSpec], encoder: Encoder, templates: Sequence[str] = DEFAULT_TEMPLATES
) -> ConceptTable:
    vectors = embed_classes(specs, encoder, templates)
    return ConceptTable(
        names=tuple(s.name for s in specs),
        vectors=vectors.astype(np.float16),
        encoder_id=encoder.encoder_id,
        encoder_sha256=encoder.sha256,
        templates=tuple(templates),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        descriptions=tuple(s.descriptions for s in specs) if any(s.descriptions for s in specs) else (),
    )


def extend_table(table: ConceptTable, specs: Sequence[ClassSpec], encoder: Encoder) -> ConceptTable:
    """Append classes, embedded with the table's own templates; refuses another encoder."""
    if encoder.sha256 != table.encoder_sha256:
        raise ConceptError(
            f"encoder mismatch: the table was built with {table.encoder_id} (weights sha256 "
            f"{table.encoder_sha256[:12]}), the loaded model {encoder.encoder_id} has {encoder.sha256[:12]}"
        )
    vectors = embed_classes(specs, encoder, table.templates)
    return table.extended(
        [s.name for s in specs],
        vectors.astype(np.float16),
        table.encoder_id,
        encoder.sha256,
        descriptions=[s.descriptions for s in specs],
    )
