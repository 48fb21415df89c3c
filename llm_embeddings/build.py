"""Build and extend concept tables from class files, optionally with description prototypes.

A class always gets its name row (the prompt ensemble, as in a single-prototype table); each of
its descriptions adds one more prototype row (the description embedded as written).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from cvm_edge.concepts import ConceptTable, normalise_rows, slugify
from cvm_edge.errors import ConceptError
from llm_embeddings.classfile import ClassSpec
from llm_embeddings.descriptions import bundled_descriptions_for, match_descriptions
from llm_embeddings.encoder import Encoder, load_encoder

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


def embed_prototypes(
    specs: Sequence[ClassSpec], prototypes: Sequence[Sequence[str]], encoder: Encoder, templates: Sequence[str]
) -> np.ndarray:
    """Rows class by class: the name row (exactly :func:`embed_classes`), then one row per description."""
    name_rows = embed_classes(specs, encoder, templates)
    flat = [t for texts in prototypes for t in texts]
    desc = encoder.encode(flat) if flat else np.zeros((0, name_rows.shape[1]), np.float32)
    rows, start = [], 0
    for i, texts in enumerate(prototypes):
        rows.append(name_rows[i : i + 1])
        rows.append(desc[start : start + len(texts)])
        start += len(texts)
    return np.concatenate(rows)


def _prototypes_for(
    specs: Sequence[ClassSpec], descriptions: Mapping[str, Sequence[str]] | None
) -> list[tuple[str, ...]]:
    if not descriptions:
        return [() for _ in specs]
    per_class, unmatched = match_descriptions([s.name for s in specs], descriptions)
    if unmatched:
        log.warning("descriptions given for classes not being embedded (ignored): %s", ", ".join(unmatched))
    return per_class


def build_table(
    specs: Sequence[ClassSpec],
    encoder: Encoder,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> ConceptTable:
    """A new table; ``descriptions`` (class name or slug -> texts) adds one prototype row per text."""
    protos = _prototypes_for(specs, descriptions)
    vectors = embed_prototypes(specs, protos, encoder, templates)
    return ConceptTable(
        names=tuple(s.name for s in specs),
        vectors=vectors.astype(np.float16),
        encoder_id=encoder.encoder_id,
        encoder_sha256=encoder.sha256,
        templates=tuple(templates),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        descriptions=tuple(s.descriptions for s in specs) if any(s.descriptions for s in specs) else (),
        prototypes=tuple(protos) if any(protos) else (),
    )


def extend_table(
    table: ConceptTable,
    specs: Sequence[ClassSpec],
    encoder: Encoder,
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> ConceptTable:
    """Append classes (and their description prototypes), embedded with the table's own templates;
    refuses another encoder. Existing classes keep their rows bit for bit; descriptions naming
    them are ignored (a class's prototypes never change once it is in the table)."""
    if encoder.sha256 != table.encoder_sha256:
        raise ConceptError(
            f"encoder mismatch: the table was built with {table.encoder_id} (weights sha256 "
            f"{table.encoder_sha256[:12]}), the loaded model {encoder.encoder_id} has {encoder.sha256[:12]}"
        )
    if descriptions:
        existing = {slugify(n) for n in table.names}
        descriptions = {k: v for k, v in descriptions.items() if slugify(k) not in existing}
    protos = _prototypes_for(specs, descriptions)
    vectors = embed_prototypes(specs, protos, encoder, table.templates)
    return table.extended(
        [s.name for s in specs],
        vectors.astype(np.float16),
        table.encoder_id,
        encoder.sha256,
        descriptions=[s.descriptions for s in specs],
        prototypes=protos,
    )


def prototype_table(
    names: Sequence[str],
    descriptions: Mapping[str, Sequence[str]] | None = None,
    encoder: Encoder | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> ConceptTable:
    """Benchmark hook: a multi-prototype table for ``names``.

    ``descriptions`` defaults to the bundled curated sets (any benchmark class name); a class
    without descriptions keeps only its name row. ``encoder`` defaults to the bundled MiniLM.
    ``table.as_float32()`` is what :func:`cvm_edge.model.build_model` takes."""
    if descriptions is None:
        descriptions = bundled_descriptions_for(names)
        missing = [n for n in names if n not in descriptions]
        if missing:
            log.warning("no bundled descriptions for %s: one prototype row each", ", ".join(missing))
    return build_table([ClassSpec(n) for n in names], encoder or load_encoder(), templates, descriptions)
