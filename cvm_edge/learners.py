"""The two learners behind ``cvm update``, one contract: from the previous version, the model and this
update's training and held-out sets, each returns its predictions on the held-out images before and
after learning, and what the new version keeps (:class:`LearnedUpdate`).

- gradient: the Strategy's training loop with the configured plugins and the replay buffer;
- analytic: the closed form on frozen backbone features (cvm_edge.analytic_learner).

``cvm update`` (cvm_edge.update) reads the folder, calls :func:`learner_for` the store's config, and
applies the forgetting gate to what it returns."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from cvm_edge.checkpoints import Checkpoint, version_name
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet
from cvm_edge.errors import StoreError
from cvm_edge.evaluate import classes_from_logits
from cvm_edge.frozen_features import FeatureSet
from cvm_edge.fsutil import fault_point
from cvm_edge.gate import ValidationScorer
from cvm_edge.model import CvmModel, ModelConfig
from cvm_edge.plugins import make_plugins
from cvm_edge.strategy import Strategy, TrainConfig, predict_logits

if TYPE_CHECKING:
    from cvm_edge.update import UpdateOptions

log = logging.getLogger(__name__)


def _gradient_predictor(strategy: Strategy, val: ImageSet, seen: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """Predictions of the strategy's model; with a frozen backbone the validation features are
    computed once and only the head is rerun (the gate costs no second backbone pass)."""
    feats = strategy.features(val.pixels) if strategy.model.backbone_frozen and len(val) else None

    def predict(keep: np.ndarray) -> np.ndarray:
        if feats is not None:
            logits = strategy.head_logits(feats[torch.from_numpy(keep).to(feats.device)])
        else:
            s = strategy
            logits = predict_logits(s.model, s.prep, val.pixels[keep], s.device, s.config.eval_batch(s.prep.image_size))
        return classes_from_logits(logits, seen)

    return predict


@dataclasses.dataclass(frozen=True)
class LearnedUpdate:
    """One learner's update: the scorer, predictions before and after, what replaces the previous
    checkpoint's fields, and the learner's own history-entry fields."""

    scorer: ValidationScorer
    pred_before: np.ndarray
    pred_after: np.ndarray
    checkpoint: dict[str, Any]
    entry: dict[str, Any]


def learn_gradient(
    prev: Checkpoint,
    model: CvmModel,
    table: ConceptTable,
    train: ImageSet,
    val: ImageSet,
    seen: list[int],
    old_classes: list[int],
    revisited: list[int],
    opts: UpdateOptions,
) -> LearnedUpdate:
    """The Strategy's training loop with the configured plugins and the replay buffer."""
    if not (isinstance(train, ImageSet) and isinstance(val, ImageSet)):
        raise TypeError("the gradient learner trains on images")
    plugins = make_plugins(opts.plugins, opts.plugin_options)
    for p in plugins:
        p.check_head(prev.model_config.head)
    for p in plugins:
        if p.name in prev.plugin_state:
            p.load_state_dict(prev.plugin_state[p.name])
    buffer = prev.buffer if opts.buffer_size is None else dataclasses.replace(prev.buffer, capacity=opts.buffer_size)
    cfg = TrainConfig(
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        replay_batch_size=opts.batch_size,
        lr=opts.lr,
        optimizer=opts.optimizer,
        augment=opts.augment,
        crop_pad=max(1, prev.prep.image_size // 8),
        seed=opts.seed,
        device=opts.device,
        progress=opts.progress,
        loss=opts.loss,
        balance_epochs=opts.balance_epochs,
        channels_last=opts.channels_last,
    )
    strategy = Strategy(model, prev.prep, plugins, cfg)
    all_val = ImageSet.concat([prev.val, val], prev.prep.image_size)
    scorer = ValidationScorer(all_val.labels, len(prev.val), _gradient_predictor(strategy, all_val, seen))
    # Old classes are judged on the held-out images of earlier updates only (for a revisited
    # class: its earlier domains), so an update that ruins what the previous version knew is
    # caught even when it does well on the new images of the same class.
    pred_before = scorer.predict(scorer.rows(old_classes, revisited))
    # phase lines: the operator sees where a long update is; the kill tests aim at each phase
    log.info(
        "training on %d images of %d class(es), starting from %s",
        len(train),
        len(train.classes),
        version_name(prev.version),
    )
    fault_point("update_training")
    result = strategy.train_experience(train, buffer, seen, old_classes, task_index=len(prev.history) + 1)
    pred_after = scorer.predict(np.ones(len(all_val), bool))
    return LearnedUpdate(
        scorer,
        pred_before,
        pred_after,
        checkpoint={
            "buffer": result.buffer,
            "val": all_val,
            "plugin_state": {p.name: p.state_dict() for p in plugins if p.name in opts.plugins},
        },
        entry={
            "learner": "gradient",
            "plugins": list(opts.plugins),
            "epochs": opts.epochs,
            "steps": result.steps,
            "images_seen": result.images_seen,
        },
    )


def learn_analytic(
    prev: Checkpoint,
    model: CvmModel,
    table: ConceptTable,
    train: FeatureSet,
    val: FeatureSet,
    seen: list[int],
    old_classes: list[int],
    revisited: list[int],
    opts: UpdateOptions,
) -> LearnedUpdate:
    """Closed form (cvm_edge.analytic_learner) on the features computed while the folder was read
    (one backbone pass): sums added, lambda chosen, solved. No images are kept: the held-out
    images' backbone features are. ``prev``'s ridge sums are consumed (G grows in place): the caller
    publishes the returned state or nothing, and never reads ``prev.analytic`` again."""
    if not (isinstance(train, FeatureSet) and isinstance(val, FeatureSet)):
        raise TypeError("the analytic learner learns from backbone features")
    from cvm_edge import analytic_learner as al

    if prev.analytic is None:
        raise StoreError(f"version {version_name(prev.version)} is an analytic store without its ridge statistics")
    state = prev.analytic
    task = len(prev.history) + 1
    fault_point("update_training")
    train_f, val_f = train.features, val.features  # computed once while the folder was read
    all_f = np.concatenate([state.held_out.features.astype(np.float32), val_f])
    all_labels = np.concatenate([state.held_out.labels, val.labels])
    predict = lambda keep: al.predict_rows(model, all_f[keep], seen)  # noqa: E731 - the model's weight at call time
    scorer = ValidationScorer(all_labels, len(state.held_out), predict)
    pred_before = scorer.predict(scorer.rows(old_classes, revisited))
    # The previous version's sums are on disk and replaced by the new ones: G grows in place rather
    # than beside a copy (134 MB at M = 4,096).
    learned = al.learn(
        model, table.as_float32(), state, train_f, train.labels, val_f, val.labels, seen, task, reuse_sums=True
    )
    pred_after = scorer.predict(np.ones(len(all_labels), bool))
    return LearnedUpdate(
        scorer,
        pred_before,
        pred_after,
        checkpoint={"analytic": learned.state},
        entry={
            "learner": "analytic",
            "targets": prev.model_config.analytic_targets,
            "relative_lambda": learned.choice.relative_lambda,
            "lambda_scores": learned.choice.scores,
            "images_seen": len(train),
            "analytic_bytes": learned.state.nbytes,
            # best class score below this: `cvm predict` (and the bundle manifest) flag the image unknown
            "unknown_threshold": al.unknown_threshold(model, learned.state, seen),
        },
    )


class Learner(Protocol):
    """Learn an update's training set into ``model`` (in place) from version ``prev``, and score the
    held-out images of every update so far before and after: what ``cvm update`` gates and publishes."""

    def __call__(
        self,
        prev: Checkpoint,
        model: CvmModel,
        table: ConceptTable,
        train: Any,
        val: Any,
        seen: list[int],
        old_classes: list[int],
        revisited: list[int],
        opts: UpdateOptions,
    ) -> LearnedUpdate: ...


def learner_for(config: ModelConfig) -> Learner:
    """The learner of a store's config (``cvm init --learner``)."""
    return learn_analytic if config.analytic else learn_gradient
