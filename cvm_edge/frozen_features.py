"""Frozen-backbone features of an update folder, decoded and run a small batch at a time.

The analytic learner needs each image's backbone features once and never its pixels. Decoding the
whole folder first held every image as 224-px pixels (~285 MB for 1,900 images, plus the train /
held-out copies); here images are decoded a batch at a time and only the features stay
(``[N, F]`` float32, 5 KB an image for Lite0).

On the CPU the backbone runs in onnxruntime: its graph optimiser folds BatchNorm into the
convolutions and fuses the activations and the "same" padding, which torch eager runs as separate
ops (for Lite0 at 224 px about 45 % of its time). The graph is the TorchScript export of the frozen
backbone, made in memory (about half a second); on the first batch it is checked against torch, and
torch runs instead when the export fails or the two differ beyond float tolerance."""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cvm_edge.augment import to_input
from cvm_edge.backbones import feature_dim
from cvm_edge.data import check_readable, decode_labelled
from cvm_edge.errors import DataError
from cvm_edge.preprocess import Preprocessing, normalise
from cvm_edge.strategy import eval_batch_for

log = logging.getLogger(__name__)

# Images decoded together (a few MB of pixels); torch runs them as one batch.
READ_BATCH = 8
# How far onnxruntime's features may be from torch's on the first images (measured: ~1e-5 for Lite0),
# and how many of them are compared (torch's activations of a small batch: a few tens of MB).
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-3
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


class BackboneFeatures:
    """uint8 NHWC pixels -> frozen backbone features (float32 ``[n, F]``), in eval mode.

    ``engine`` says what runs them: ``"onnxruntime"`` (CPU) or ``"torch"``."""

    def __init__(self, backbone: torch.nn.Module, prep: Preprocessing, device: torch.device | str = "cpu") -> None:
        self.backbone = backbone.eval()
        self.prep = prep
        self.device = torch.device(device)
        self._session = self._onnx_session() if self.device.type == "cpu" else None
        self._checked = False

    @property
    def engine(self) -> str:
        return "onnxruntime" if self._session is not None else "torch"

    def _onnx_session(self) -> object | None:
        try:
            import onnxruntime as ort

            buf = io.BytesIO()
            size = self.prep.image_size
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                # TorchScript exporter: a frozen backbone's graph in well under a second (the
                # torch.export-based one takes ~10 s on 2 cores, which is what this saves).
                torch.onnx.export(
                    self.backbone,
                    (torch.zeros(1, 3, size, size),),
                    buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to a file object too
                    opset_version=17,
                    dynamo=False,
                    input_names=["input"],
                    output_names=["features"],
                    dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
                )
            so = ort.SessionOptions()
            # torch's thread count is the process's budget (set from the core count or OMP_NUM_THREADS)
            so.intra_op_num_threads = torch.get_num_threads()
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a shared small CPU
            so.enable_cpu_mem_arena = False  # one image a call: malloc is as fast, and the memory goes back
            return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
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
        run = self._session.run  # type: ignore[attr-defined]
        # One image a call: as fast per image as batches on 2 cores, and onnxruntime's arena then
        # holds one image's activations (+20 MB), not eight's (+200 MB).
        got = np.concatenate([run(["features"], {"input": normalise(p, self.prep)})[0] for p in pixels])
        got = got.astype(np.float32, copy=False)
        if not self._checked:
            self._checked = True
            n = min(len(pixels), PARITY_IMAGES)
            ref = self.torch_features(pixels[:n])
            if not np.allclose(got[:n], ref, rtol=PARITY_RTOL, atol=PARITY_ATOL):
                diff = float(np.abs(got[:n] - ref).max()) if ref.shape == got[:n].shape else float("inf")
                log.warning("onnxruntime backbone features differ from torch's (max %.3g); using torch", diff)
                self._session = None
                return self.torch_features(pixels)
        return got


def read_features(
    pairs: Sequence[tuple[Path, int]],
    data_dir: Path,
    prep: Preprocessing,
    extract: BackboneFeatures,
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
