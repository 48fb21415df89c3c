"""The analytic learner of ``cvm update``: frozen backbone features, ridge sums, a closed-form solve.

An update extracts backbone features once, adds the training images' lifted features to the
store's sums (``cvm_edge.analytic``), picks lambda on the held-out images of every update so far,
and sets the head's ridge weight. The store keeps the sums and the held-out images' backbone
*features* (float16, for the gate and the lambda choice), never pixels."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from cvm_edge.analytic import HeldOut, LambdaChoice, RidgePath, RidgeStats, choose_lambda, class_targets
from cvm_edge.analytic import projection_digest as digest_of
from cvm_edge.augment import to_input
from cvm_edge.backbones import feature_dim
from cvm_edge.model import MAX_LOGIT_SCALE, AnalyticMapper, ConceptHead, CvmModel
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import eval_batch_for

log = logging.getLogger(__name__)

ANALYTIC_FILE = "analytic.npz"
LIFT_CHUNK = 256  # images lifted and added to G at a time (4 MB of float64 features at M = 2,048)


@dataclasses.dataclass(frozen=True)
class AnalyticState:
    """What an analytic store keeps between updates besides the model weights."""

    stats: RidgeStats
    held_out: HeldOut
    projection_digest: str  # sha256 prefix of P: a rebuilt projection must match it

    @staticmethod
    def empty(model: CvmModel) -> AnalyticState:
        mapper = analytic_mapper(model)
        feat_dim, dim = mapper.projection.shape
        return AnalyticState(
            RidgeStats.empty(int(dim), model.table_rows),
            HeldOut.empty(int(feat_dim)),
            digest_of(mapper.projection.cpu().numpy()),
        )

    def write(self, file: BinaryIO) -> None:
        """The state as an .npz, streamed into ``file``: no in-memory copy of the archive (at M = 4,096
        G's upper triangle alone is 67 MB, and a bytes buffer of it would be two more copies)."""
        held_out = {
            "val_features": self.held_out.features,
            "val_labels": self.held_out.labels,
            "val_tasks": self.held_out.tasks,
            "projection_digest": np.asarray(self.projection_digest),
        }
        self.stats.write_npz(file, held_out)

    @staticmethod
    def from_bytes(data: bytes) -> AnalyticState:
        """Parse and check shapes (a tampered or truncated file raises ValueError)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        stats = RidgeStats.from_arrays(arrays)
        feats = arrays["val_features"]
        labels = arrays["val_labels"].astype(np.int64)
        tasks = arrays["val_tasks"].astype(np.int64)
        if feats.ndim != 2 or not len(feats) == len(labels) == len(tasks):
            raise ValueError("held-out features, labels and tasks differ in length")
        if len(labels) and (labels.min() < 0 or labels.max() >= stats.rows):
            raise ValueError("held-out labels outside the table")
        return AnalyticState(stats, HeldOut(feats.astype(np.float16), labels, tasks), str(arrays["projection_digest"]))

    @property
    def nbytes(self) -> int:
        h = self.held_out
        return self.stats.nbytes + h.features.nbytes + h.labels.nbytes + h.tasks.nbytes


def analytic_mapper(model: CvmModel) -> AnalyticMapper:
    mapper = model.head.mapper
    if not isinstance(mapper, AnalyticMapper):
        raise TypeError("this model was not built with the analytic learner")
    return mapper


@torch.no_grad()
def backbone_features(
    backbone: torch.nn.Module, prep: Preprocessing, pixels: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Frozen backbone features of uint8 NHWC pixels (float32 ``[N, F]``), batched, eval mode."""
    backbone.eval()
    bs = eval_batch_for(prep.image_size)
    out = []
    for i in range(0, len(pixels), bs):
        x = to_input(torch.from_numpy(pixels[i : i + bs]).to(device), prep).contiguous(
            memory_format=torch.channels_last
        )
        out.append(backbone(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, feature_dim(backbone)), np.float32)


@torch.no_grad()
def lifted(model: CvmModel, features: np.ndarray) -> np.ndarray:
    """``relu(f @ P)`` through the served module's own ``P``, as float64 for the sums."""
    mapper = analytic_mapper(model)
    h = mapper.lift(torch.from_numpy(np.asarray(features, np.float32)).to(mapper.projection.device))
    return h.double().cpu().numpy()


@torch.no_grad()
def rows_from_outputs(model: CvmModel, outputs: np.ndarray, seen: Sequence[int]) -> np.ndarray:
    """Predicted table rows (among ``seen``) of ridge outputs ``h @ W``: the nearest concept row by
    the head's own class score (cosine; multi-prototype LogSumExp), or the largest one-hot score."""
    seen_arr = np.asarray(seen, np.int64)
    if isinstance(model.head, ConceptHead):
        z = F.normalize(torch.from_numpy(np.asarray(outputs, np.float32)).to(model.head.table.device), dim=-1)
        scores = model.head.cosines(z).cpu().numpy()
    else:
        scores = np.asarray(outputs)
    return seen_arr[np.argmax(scores[:, seen_arr], axis=1)]


@torch.no_grad()
def predict_rows(model: CvmModel, features: np.ndarray, seen: Sequence[int]) -> np.ndarray:
    """Predicted table rows of backbone features with the model's current weight."""
    if not len(features):
        return np.zeros(0, np.int64)
    mapper = analytic_mapper(model)
    out = mapper(torch.from_numpy(np.asarray(features, np.float32)).to(mapper.projection.device))
    return rows_from_outputs(model, out.cpu().numpy(), seen)


# Share of known held-out images that the unknown threshold may flag: the threshold is this quantile of
# their best class scores, so about 95 % of images of learned classes pass.
UNKNOWN_QUANTILE = 0.05


@torch.no_grad()
def best_scores(model: CvmModel, features: np.ndarray, seen: Sequence[int]) -> np.ndarray:
    """Each image's best class score among ``seen``, in the head's own units (cosine; the raw one-hot
    ridge score for RidgeHead): logits divided by the logit scale."""
    if not len(features):
        return np.zeros(0)
    mapper = analytic_mapper(model)
    f = torch.from_numpy(np.asarray(features, np.float32)).to(mapper.projection.device)
    logits = model.head.logits_from_embedding(model.head.embed(f))
    return (logits / logit_scale(model))[:, list(seen)].max(dim=1).values.double().cpu().numpy()


def logit_scale(model: CvmModel) -> float:
    """The multiplier between an analytic head's class scores and its logits."""
    raw = getattr(model.head, "logit_scale", None)
    if not isinstance(raw, torch.Tensor):
        raise TypeError("this head has no logit scale")
    return float(raw.detach().clamp(max=MAX_LOGIT_SCALE).exp())


def unknown_threshold(model: CvmModel, state: AnalyticState, seen: Sequence[int]) -> float | None:
    """The :data:`UNKNOWN_QUANTILE` of the held-out images' best scores (None without held-out images)."""
    scores = best_scores(model, state.held_out.features.astype(np.float32), seen)
    return round(float(np.quantile(scores, UNKNOWN_QUANTILE)), 6) if len(scores) else None


@dataclasses.dataclass(frozen=True)
class Learned:
    state: AnalyticState
    choice: LambdaChoice


def learn(
    model: CvmModel,
    table: np.ndarray,
    state: AnalyticState,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    seen: Sequence[int],
    task: int,
    reuse_sums: bool = False,
) -> Learned:
    """Add the training images to the sums, choose lambda on every held-out image so far, and set
    the model's ridge weight (in place). Returns the new state; the old one is untouched, unless
    ``reuse_sums`` lets the new G be the old one's array (:meth:`RidgeStats.add_chunks`)."""
    digest = digest_of(analytic_mapper(model).projection.cpu().numpy())
    if digest != state.projection_digest:
        raise ValueError(f"the rebuilt random projection ({digest}) is not the store's ({state.projection_digest})")
    # Lifted a chunk at a time: never all of the update's [N, M] float64 features at once.
    chunks = (
        (lifted(model, train_features[i : i + LIFT_CHUNK]), train_labels[i : i + LIFT_CHUNK])
        for i in range(0, len(train_labels), LIFT_CHUNK)
    )
    stats = state.stats.grown(model.table_rows).add_chunks(chunks, reuse=reuse_sums)
    held_out = state.held_out.added(val_features, val_labels, task)
    targets = class_targets(table, model.config.analytic_targets)
    path = RidgePath.of(stats, targets)
    # Held-out images of classes that this solve knows (every held-out image's class is seen).
    choice = choose_lambda(
        path,
        lifted(model, held_out.features.astype(np.float32)),
        held_out.labels,
        lambda out: rows_from_outputs(model, out, seen),
    )
    analytic_mapper(model).set_weight(choice.weight)
    log.info(
        "ridge solved: lambda %g x mean diag(G), held-out balanced accuracy per lambda %s",
        choice.relative_lambda,
        choice.scores,
    )
    return Learned(AnalyticState(stats, held_out, state.projection_digest), choice)
