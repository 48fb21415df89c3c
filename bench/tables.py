"""Concept tables for benchmark class lists, built once with the bundled MiniLM and cached.

Linear-head baselines never read the table's vectors (only its row count), so they get a zero
table and need no sentence-transformers install.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.datasets import cache_dir

log = logging.getLogger(__name__)


def table_path(names: Sequence[str], prototypes: bool = False) -> Path:
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]
    kind = "protos" if prototypes else "concepts"
    return cache_dir() / "tables" / f"{kind}-{len(names)}-{digest}.npz"


def concept_vectors(names: Sequence[str], prototypes: bool = False) -> tuple[np.ndarray, str]:
    """(float32 table, fingerprint) for ``names``, from the cache or built with MiniLM: ``[C, D]``,
    or with ``prototypes`` ``[C, P, D]`` (name row + one row per bundled curated description)."""
    from cvm_edge.concepts import ConceptTable

    path = table_path(names, prototypes)
    if not path.is_file():
        from llm_embeddings.build import DEFAULT_TEMPLATES, build_table, prototype_table
        from llm_embeddings.classfile import ClassSpec
        from llm_embeddings.encoder import load_encoder

        log.info("building the concept table for %d classes with the bundled MiniLM", len(names))
        if prototypes:
            table = prototype_table(names)
        else:
            table = build_table([ClassSpec(n) for n in names], load_encoder(), DEFAULT_TEMPLATES)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    table = ConceptTable.load(path)
    if tuple(table.names) != tuple(names):
        raise ValueError(f"cached table {path} holds other class names")
    return table.as_float32(), table.fingerprint


def dummy_vectors(n: int) -> np.ndarray:
    """A placeholder table for linear heads (one row per class; the vectors are never used)."""
    return np.zeros((n, 8), np.float32)
