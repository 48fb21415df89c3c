"""Frozen-backbone features of an update folder, decoded and run a small batch at a time.

The analytic learner needs each image's backbone features once and never its pixels. Decoding the
whole folder first held every image as 224-px pixels (~285 MB for 1,900 images, plus the train /
held-out copies); here images are decoded a batch at a time and only the features stay
(``[N, F]`` float32, 5 KB an image for Lite0).

On the CPU the backbone runs in onnxruntime: from the store's own backbone graph where it keeps one
(:class:`GraphFeatures`, no torch module at all), else from a graph made in memory and checked
against torch (:class:`BackboneFeatures`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cvm_edge import backbone_graph as bg
from cvm_edge.augment import to_input
from cvm_edge.backbones import feature_dim
from cvm_edge.data import check_readable, decode_labelled
from cvm_edge.errors import DataError
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import eval_batch_for

log = logging.getLogger(__name__)

# Images decoded together (a few MB of pixels); torch runs them as one batch.
READ_BATCH = 8
# How many of the first images are also run in torch to check an in-memory graph (torch's
# activations of a small batch: a few tens of MB).
PARITY_IMAGES = 2


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Backbone features of an update folder's readable images, with their table rows and files."""

    features: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N] int64
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[int]:
        return sorted({int(c) for c in self.labels})

    def subset(self, idx: np.ndarray) -> FeatureSet:
        return FeatureSet(self.features[idx], self.labels[idx], tuple(self.paths[int(i)] for i in idx))


class FeatureExtractor(Protocol):
    """uint8 NHWC pixels -> frozen backbone features (float32 ``[n, F]``)."""

    @property
    def engine(self) -> str: ...

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


class GraphFeatures:
    """Features from a store's backbone graph (cvm_edge.backbone_graph) in onnxruntime: no torch
    module, no export. The graph was checked against torch when it was made."""

    engine = "onnxruntime, the store's backbone graph"

    def __init__(self, graph: bytes, prep: Preprocessing, threads: int | None = None) -> None:
        self.prep = prep
        self._session = bg.session(graph, threads or torch.get_num_threads())

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if not len(pixels):
            return np.zeros((0, 0), np.float32)
        return bg.run_graph(self._session, pixels, self.prep)


class BackboneFeatures:
    """Features of a torch backbone module, in eval mode.

    On the CPU they run in onnxruntime: its graph optimiser folds BatchNorm into the convolutions
    and fuses the activations and the "same" padding, which torch eager runs as separate ops (for
    Lite0 at 224 px about 45 % of its time). The graph is made in memory (about a second) and, on
    the first batch, checked against torch; torch runs instead when the export fails or the two
    differ beyond float tolerance. ``graph`` is that checked graph (None until then, or without one)."""

    def __init__(self, backbone: torch.nn.Module, prep: Preprocessing, device: torch.device | str = "cpu") -> None:
        self.backbone = backbone.eval()
        self.prep = prep
        self.device = torch.device(device)
        self._graph: bytes | None = None
        self._session = self._onnx_session() if self.device.type == "cpu" else None
        self._checked = False

    @property
    def engine(self) -> str:
        return "onnxruntime" if self._session is not None else "torch"

    @property
    def graph(self) -> bytes | None:
        """The in-memory graph once it has passed its check against torch on real images."""
        return self._graph if self._checked and self._session is not None else None

    def _onnx_session(self) -> object | None:
        try:
            self._graph = bg.export_graph(self.backbone, self.prep.image_size)
            # torch's thread count is the process's budget (set from the core count or OMP_NUM_THREADS)
            return bg.session(self._graph, torch.get_num_threads())
        except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure: torch computes the same features
            log.info("backbone features run in torch (no onnxruntime graph: %s: %s)", type(exc).__name__, exc)
            return None

    @torch.inference_mode()
    def torch_features(self, pixels: np.ndarray) -> np.ndarray:
        bs = eval_batch_for(self.prep.image_size)
        out = []
        for i in range(0, len(pixels), bs):
            x = to_input(torch.from_numpy(pixels[i : i + bs]).to(self.device), self.prep)
            out.append(self.backbone(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, feature_dim(self.backbone)), np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self._session is None or not len(pixels):
            return self.torch_features(pixels)
        got = bg.run_graph(self._session, pixels, self.prep)
        if not self._checked:
            self._checked = True
            n = min(len(pixels), PARITY_IMAGES)
            diff = bg.graph_mismatch(got[:n], self.backbone, self.prep, pixels[:n])
            if diff:
                log.warning("onnxruntime backbone features differ from torch's (max %.3g); using torch", diff)
                self._session = None
                return self.torch_features(pixels)
        return got


def read_features(
    pairs: Sequence[tuple[Path, int]],
    data_dir: Path,
    prep: Preprocessing,
    extract: FeatureExtractor,
    skip_bad: bool = False,
    progress: bool = True,
    batch: int = READ_BATCH,
) -> FeatureSet:
    """Features of every readable file of ``pairs``, decoded ``batch`` images at a time. Unreadable
    files raise one error listing them all, or are skipped when ``skip_bad``, as
    :func:`cvm_edge.data.load_image_folder` does; after the first unreadable file (without
    ``skip_bad``) the rest are only decoded, to list them, not run."""
    feats: list[np.ndarray] = []
    good: list[int] = []
    bad: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending and not (bad and not skip_bad):
            feats.append(extract(np.stack(pending)))
        pending.clear()

    for i, px, reason in decode_labelled(pairs, prep, skip_bad, progress):
        if px is None:
            bad.append(str(reason))
            continue
        good.append(i)
        pending.append(px)
        if len(pending) >= batch:
            flush()
    flush()
    check_readable(bad, len(good), data_dir, skip_bad)
    features = np.concatenate(feats).astype(np.float32, copy=False)
    labels = np.asarray([pairs[i][1] for i in good], np.int64)
    return FeatureSet(features, labels, tuple(pairs[i][0] for i in good))


def decode_files(paths: Sequence[Path], prep: Preprocessing) -> np.ndarray:
    """uint8 NHWC pixels of ``paths`` (files :func:`read_features` read already; a file that became
    unreadable since raises its DataError)."""
    pixels = np.empty((len(paths), prep.image_size, prep.image_size, 3), np.uint8)
    for k, (_i, px, reason) in enumerate(decode_labelled([(p, 0) for p in paths], prep, False, False)):
        if px is None:
            raise DataError(f"an image changed while the update read it: {reason}")
        pixels[k] = px
    return pixels
