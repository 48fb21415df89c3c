"""``cvm init`` and ``cvm update``, the use cases: create the store; read an update folder, learn it
through the store's learner (cvm_edge.learners), hold it to the forgetting gate (cvm_edge.gate) and
publish a version. The report and ``cvm status``: cvm_edge.update_report; a version as a model:
cvm_edge.loading."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge import vocabulary
from cvm_edge.analytic import DEFAULT_DIM
from cvm_edge.analytic_learner import AnalyticState
from cvm_edge.backbone_graph import checked_graph
from cvm_edge.backbones import check_image_size
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.checkpoints import DEFAULT_KEEP_VERSIONS, Checkpoint, CheckpointStore, version_name
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet, content_holdout_indices, holdout_split, list_labelled_files, load_image_folder
from cvm_edge.errors import ConceptError, ForgettingGateError, StoreError, UsageError
from cvm_edge.evaluate import mean_over
from cvm_edge.frozen_features import BackboneFeatures, FeatureSet, GraphFeatures, decode_files, read_features
from cvm_edge.fsutil import FileLock, fault_point
from cvm_edge.gate import forgetting_gate, revisited_figures, worst_drops
from cvm_edge.lab.similarity import class_vectors, task_similarity
from cvm_edge.learners import LearnedUpdate, learner_for
from cvm_edge.loading import graph_to_run, head_from_checkpoint, model_from_checkpoint, version_weights
from cvm_edge.memory import release_freed_memory
from cvm_edge.model import (
    DEFAULT_PROTOTYPE_TEMPERATURE,
    DEFAULT_ROUTING_TEMPERATURE,
    CvmModel,
    ModelConfig,
    build_model,
)
from cvm_edge.plugins import PluginOptions
from cvm_edge.preprocess import Preprocessing
from cvm_edge.update_report import UpdateReport, update_kind

log = logging.getLogger(__name__)

DEFAULT_BUFFER = vocabulary.DEFAULT_BUFFER
_INIT, _UPDATE = vocabulary.INIT, vocabulary.UPDATE


@dataclasses.dataclass(frozen=True)
class InitOptions:
    """What ``cvm init`` makes; defaults and choices from :data:`cvm_edge.vocabulary.INIT`."""

    concepts: Path
    backbone: str
    image_size: int
    train_backbone: str = "all"
    head: str = _INIT["head"].default
    mapper_hidden: int = _INIT["mapper_hidden"].default
    pretrained: str = "none"
    buffer_size: int = DEFAULT_BUFFER
    seed: int = 0
    prototype_temperature: float = DEFAULT_PROTOTYPE_TEMPERATURE  # multi-prototype tables only
    experts: str = _INIT["experts"].default  # per-task experts (cvm_edge.lab.experts): none | adapter
    expert_rank: int = _INIT["expert_rank"].default
    routing: str = _INIT["routing"].default
    routing_temperature: float = DEFAULT_ROUTING_TEMPERATURE
    expert_shared_mapper: str = _INIT["expert_shared_mapper"].default
    learner: str = "gradient"  # gradient | analytic (closed form, frozen backbone: cvm_edge.analytic)
    analytic_dim: int = DEFAULT_DIM
    analytic_targets: str = _INIT["targets"].default
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # newest versions the store keeps after each publish; 0: all


def resolve_backbone(opts: InitOptions) -> tuple[torch.nn.Module | None, Preprocessing, str]:
    """The backbone (None: a fresh one is made from the config), the preprocessing it needs and
    the timm name that rebuilds it."""
    if opts.pretrained == "none":
        return None, Preprocessing(image_size=opts.image_size), opts.backbone
    from cvm_edge.pretrained import load_pretrained_backbone

    return load_pretrained_backbone(opts.backbone, opts.pretrained, opts.image_size)


def init_store(workdir: Path, opts: InitOptions) -> int:
    store = CheckpointStore(workdir)
    table = ConceptTable.load(opts.concepts)
    with FileLock(store.lock_path, "cvm init"):
        store.clean_stale()
        if store.exists():
            raise StoreError(f"{workdir} is already initialised (version {version_name(store.latest())})")
        torch.manual_seed(opts.seed)
        backbone, prep, timm_name = resolve_backbone(opts)
        try:
            config = ModelConfig(
                backbone=timm_name,
                image_size=opts.image_size,
                train_backbone=opts.train_backbone,
                head=opts.head,
                mapper_hidden=opts.mapper_hidden,
                pretrained=opts.pretrained,
                prototype_temperature=opts.prototype_temperature,
                experts=opts.experts,
                expert_rank=opts.expert_rank,
                routing=opts.routing,
                routing_temperature=opts.routing_temperature,
                expert_shared_mapper=opts.expert_shared_mapper,
                learner=opts.learner,
                analytic_dim=opts.analytic_dim,
                analytic_seed=opts.seed,
                analytic_targets=opts.analytic_targets,
            )
        except ValueError as exc:  # e.g. experts on a linear head: the options are wrong, not the program
            raise UsageError(str(exc)) from None
        model = build_model(config, table.as_float32(), pretrained_backbone=backbone)
        check_image_size(model.backbone, timm_name, opts.image_size)  # a wrong size fails here, before any write
        ckpt = Checkpoint(
            model_config=config,
            prep=prep,
            table=table,
            weights=model.weights_state(),
            buffer=ReplayBuffer.empty(opts.buffer_size, opts.image_size),
            val=ImageSet.concat([], opts.image_size),
            seen=(),
            history=(),
            plugin_state={},
            analytic=AnalyticState.empty(model) if config.analytic else None,
            backbone_graph=_backbone_graph(model, prep) if config.analytic else None,
            keep_versions=opts.keep_versions,
        )
        return store.save(ckpt)


def _backbone_graph(model: CvmModel, prep: Preprocessing) -> bytes | None:
    """The frozen backbone's checked graph for an analytic store, or None (its updates then build the
    timm module, as before) when the export fails or differs from torch."""
    try:
        return checked_graph(model.backbone, prep)
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure leaves the torch path
        log.warning(
            "no backbone graph kept (%s: %s); updates will build the backbone in torch", type(exc).__name__, exc
        )
        return None


@dataclasses.dataclass(frozen=True)
class UpdateOptions:
    """What ``cvm update`` does; defaults and choices from :data:`cvm_edge.vocabulary.UPDATE`."""

    data_dir: Path
    epochs: int = _UPDATE["epochs"].default
    batch_size: int = _UPDATE["batch_size"].default
    lr: float = _UPDATE["lr"].default
    optimizer: str = _UPDATE["optimizer"].default
    buffer_size: int | None = None  # None keeps the store's current capacity
    plugins: tuple[str, ...] = _UPDATE["plugins"].default
    plugin_options: PluginOptions = dataclasses.field(default_factory=PluginOptions)
    max_forgetting: float = _UPDATE["max_forgetting"].default
    force: bool = False
    seed: int = _UPDATE["seed"].default
    holdout: float = _UPDATE["holdout"].default
    # "seeded": a seeded per-class split of this update's images; "content": each image's side follows
    # from its pixels (cvm_edge.data.content_holdout_indices), for a caller that retrains on a folder
    # that keeps growing (a fleet device), so an image once held out is never trained on.
    holdout_by: str = "seeded"
    skip_bad_images: bool = False
    concepts: Path | None = None
    device: str = "cpu"
    augment: bool = True
    progress: bool = True
    loss: str = _UPDATE["loss"].default
    balance_epochs: int = _UPDATE["balance_epochs"].default
    keep_versions: int | None = None  # None keeps the store's setting; else it becomes the setting
    channels_last: bool = True  # NHWC: about 2-3x faster CPU training and inference for Lite0 (bench/update.py)
    # A caller's tag, recorded as the version's history entry's "label": written in the same atomic step
    # as the version, so a caller killed after the update can tell from the store whether it landed
    # (a fleet device records which of its files it learnt this way).
    label: str = ""


def _load_table_for_update(current: ConceptTable, path: Path | None) -> ConceptTable:
    if path is None:
        return current
    new = ConceptTable.load(path)
    if not current.is_prefix_of(new):
        raise ConceptError(
            f"{path} is not an append-only extension of the store's concept table "
            f"(fingerprint {current.fingerprint}); build it with `cvm embed extend`"
        )
    return new


@dataclasses.dataclass(frozen=True)
class SavedUpdate:
    """A version :func:`save_update` published: its history entry, the store's keep setting, and
    (analytic stores, which keep no images) the images its export checks parity on."""

    version: int
    entry: dict[str, Any]
    keep: int
    parity: ImageSet | None


def run_update(workdir: Path, opts: UpdateOptions) -> UpdateReport:
    """Train on ``opts.data_dir`` and publish a new version, or raise with nothing written; the
    store lock is held throughout. ``cvm update`` holds the lock itself, to export in between."""
    store = CheckpointStore(workdir)
    with FileLock(store.lock_path, "cvm update"):
        return finish_update(store, save_update(store, opts))


def finish_update(store: CheckpointStore, saved: SavedUpdate) -> UpdateReport:
    """After LATEST (and, when exporting, CURRENT) moved, remove versions beyond the store's keep
    setting: what is removed is never what is served. Call while holding the lock."""
    return UpdateReport(version=saved.version, entry=saved.entry, pruned=tuple(_prune(store, saved.keep)))


def save_update(store: CheckpointStore, opts: UpdateOptions, export_follows: bool = False) -> SavedUpdate:
    """Learn ``opts.data_dir``, gate on forgetting and save the new version. Call while holding
    the store lock; everything it loaded is freed when it returns. ``export_follows``: keep the
    images an analytic store's export checks parity on (it keeps none of its own)."""
    t0 = time.perf_counter()
    store.clean_stale()
    prev = store.load()
    _check_holdout(opts, prev.model_config)  # before the folder is read
    table = _load_table_for_update(prev.table, opts.concepts)
    # An analytic store with its backbone graph builds no backbone module (no timm): onnxruntime
    # runs the graph, torch the head.
    run_graph = graph_to_run(prev, opts.device)
    model = (head_from_checkpoint(prev) if run_graph is not None else model_from_checkpoint(prev)).to(
        torch.device(opts.device)
    )
    if table is not prev.table:
        model.set_table(table.as_float32())
    data, graph = _read_update_data(opts, table, prev, model, run_graph)
    release_freed_memory()  # the reading's activations: the peak is the largest step's, not their sum
    train, val = _holdout(data, opts)
    trained_classes = data.classes
    del data  # train and val are copies: at 224 px the full set of pixels is hundreds of MB
    # Every class the previous version knew is old, also when this update brings new images of
    # it (a new camera, lighting, season): the gate and distillation protect what it knew.
    old_classes = sorted(int(c) for c in prev.seen)
    revisited = [c for c in trained_classes if c in old_classes]
    new_classes = [c for c in trained_classes if c not in old_classes]
    kind = update_kind(new_classes, revisited)
    seen = sorted(set(old_classes) | set(trained_classes))
    _log_update_kind(kind, new_classes, revisited, table.names)
    # Task similarity from the concept table (before training): reported, and the factor the
    # distill/ewc plugins apply when similarity_scaling is set (they compute it the same way).
    similarity = task_similarity(class_vectors(table.as_float32()), new_classes, old_classes)
    log.info("task similarity: %s", similarity.summary(table.names))
    learned = learner_for(prev.model_config)(prev, model, table, train, val, seen, old_classes, revisited, opts)
    scores = _Scores.of(learned, old_classes, revisited, seen)
    entry = _history_entry(prev, table, learned, scores, trained_classes, new_classes, revisited, kind, t0)
    entry |= {"n_train": len(train), "n_val": len(val)}
    entry |= {"similarity": similarity.to_dict(table.names, opts.plugin_options.similarity_scaling)}
    entry |= {"label": opts.label} if opts.label else {}
    _gate(entry, prev.history, scores, table, opts)
    log.info("trained and evaluated in %.1f s; saving the checkpoint", time.perf_counter() - t0)
    fault_point("update_saving")
    ckpt = dataclasses.replace(
        prev,
        table=table,
        weights=version_weights(prev, model),
        seen=tuple(seen),
        history=(*prev.history, entry),
        plugins=tuple(opts.plugins) if not prev.model_config.analytic else (),
        keep_versions=prev.keep_versions if opts.keep_versions is None else opts.keep_versions,
        backbone_graph=graph,
        **learned.checkpoint,
    )
    keep = ckpt.keep_versions
    version = store.save(ckpt)
    entry["version"] = version
    entry["store_mb"] = round(store.version_bytes(version) / 1e6, 3)
    # An analytic store keeps no images, so its export checks parity on this update's.
    keeps_images = bool(ckpt.val.pixels.size or len(ckpt.buffer))
    parity = parity_sample(val, train, ckpt.prep) if export_follows and not keeps_images else None
    return SavedUpdate(version=version, entry=entry, keep=keep, parity=parity)


@dataclasses.dataclass(frozen=True)
class _Scores:
    """Held-out accuracy per class from the learner's predictions, computed once for the history
    entry and the gate."""

    old_classes: list[int]
    seen: list[int]
    old_before: dict[int, float]  # old classes on their earlier held-out images, before this update
    old_after: dict[int, float]  # the same images, after
    all_after: dict[int, float]  # every seen class on all held-out images, after
    revisited_before: dict[int, float]  # revisited classes on this update's held-out images
    revisited_after: dict[int, float]

    @classmethod
    def of(cls, learned: LearnedUpdate, old_classes: list[int], revisited: Sequence[int], seen: list[int]) -> _Scores:
        scorer, before, after = learned.scorer, learned.pred_before, learned.pred_after
        return cls(
            old_classes,
            seen,
            scorer.accuracy(before, old_classes, "earlier"),
            scorer.accuracy(after, old_classes, "earlier"),
            scorer.accuracy(after, seen, "all"),
            scorer.accuracy(before, revisited, "current"),
            scorer.accuracy(after, revisited, "current"),
        )


def _history_entry(
    prev: Checkpoint,
    table: ConceptTable,
    learned: LearnedUpdate,
    scores: _Scores,
    trained: Sequence[int],
    new_classes: Sequence[int],
    revisited: Sequence[int],
    kind: str,
    t0: float,
) -> dict[str, Any]:
    """The update's history entry: which classes it trained, and accuracy on the held-out images
    before and after (per class, old, new, revisited, all), with what the learner reports."""
    s = scores
    return {
        "task": len(prev.history) + 1,
        "kind": kind,
        "new_classes": list(new_classes),
        "new_class_names": [table.names[c] for c in new_classes],
        "revisited_classes": list(revisited),
        "revisited_class_names": [table.names[c] for c in revisited],
        "trained_classes": list(trained),
        "revisited": revisited_figures(revisited, s.revisited_before, s.revisited_after, s.old_before, s.old_after),
        "per_class_accuracy": {str(c): round(v, 6) for c, v in s.all_after.items()},
        "old_accuracy_before": mean_over(s.old_before, s.old_classes),
        "old_accuracy": mean_over(s.old_after, s.old_classes),
        "new_accuracy": mean_over(s.all_after, new_classes),
        "all_accuracy": mean_over(s.all_after, s.seen),
        **learned.entry,
        "images_per_s": learned.entry["images_seen"] / max(1e-9, time.perf_counter() - t0),
        "wall_s": time.perf_counter() - t0,
        "forced": False,
    }


def _gate(
    entry: dict[str, Any], history: Sequence[dict[str, Any]], scores: _Scores, table: ConceptTable, opts: UpdateOptions
) -> None:
    """The forgetting gate: its figures go into ``entry``; past ``opts.max_forgetting`` the update
    is refused, or published as forced with ``opts.force``."""
    gate = forgetting_gate(history, scores.old_classes, scores.old_before, scores.old_after)
    entry.update(gate.figures())
    worst = max(gate.since_previous, gate.since_learned)
    if worst <= opts.max_forgetting:
        return
    if not opts.force:
        raise ForgettingGateError(
            f"{gate.describe()}, over --max-forgetting {opts.max_forgetting:g}; nothing was published."
            f"{worst_drops(gate.reference, scores.old_after, table.names)} Train with replay/distill, or pass --force"
        )
    entry["forced"] = True
    log.warning("old-class accuracy fell by %.1f points; publishing anyway (--force)", worst)


def _prune(store: CheckpointStore, keep: int) -> list[int]:
    """Remove versions beyond the newest ``keep``; a failure here costs disk space, not the update."""
    try:
        return store.prune(keep)
    except (OSError, StoreError) as exc:
        log.warning("published, but older versions could not be removed (%s); the next update retries", exc)
        return []


# Images an analytic update hands its export for the fp32 parity check: a seeded sample, held-out images
# first, as many as the gate needs (deploy.export.MIN_PARITY_IMAGES). Each costs a torch and an
# onnxruntime pass of the whole model; 256 took ~4 s of a 2-core update. `cvm export --images DIR`
# checks (and calibrates int8) on up to 256.
PARITY_SAMPLE = 64


def parity_sample(
    val: ImageSet | FeatureSet, train: ImageSet | FeatureSet, prep: Preprocessing, n: int = PARITY_SAMPLE
) -> ImageSet:
    """Up to ``n`` of this update's images, all of ``val`` first (labels known), then seeded training
    ones; for an analytic update (features only) the chosen files are decoded again."""
    rng = np.random.default_rng(0)
    v = val.subset(np.sort(rng.permutation(len(val))[:n]))
    t = train.subset(np.sort(rng.permutation(len(train))[: max(0, n - len(v))]))
    labels = np.concatenate([v.labels, t.labels])
    if isinstance(v, FeatureSet) and isinstance(t, FeatureSet):
        return ImageSet(decode_files(v.paths + t.paths, prep), labels)
    if isinstance(v, ImageSet) and isinstance(t, ImageSet):
        return ImageSet(np.concatenate([v.pixels, t.pixels]), labels)
    raise TypeError("held-out and training sets of different kinds")


def _read_update_data(
    opts: UpdateOptions, table: ConceptTable, prev: Checkpoint, model: CvmModel, run_graph: bytes | None
) -> tuple[ImageSet | FeatureSet, bytes | None]:
    """The update folder as pixels (gradient learner), or for the analytic learner as frozen backbone
    features (from ``run_graph`` where given, else from ``model``'s backbone), decoded and run a batch
    at a time so that no image set is held in memory; and the backbone graph the new version keeps
    (the store's, or for a store from before one the update made and checked on its images)."""
    hint = str(opts.concepts or "TABLE.npz")
    if not prev.model_config.analytic:
        images = load_image_folder(
            opts.data_dir, table, prev.prep, skip_bad=opts.skip_bad_images, table_hint=hint, progress=opts.progress
        )
        return images, None
    pairs = list_labelled_files(opts.data_dir, table, hint)
    extract: GraphFeatures | BackboneFeatures
    if run_graph is not None:
        extract = GraphFeatures(run_graph, prev.prep)
    else:
        extract = BackboneFeatures(model.backbone, prev.prep, opts.device)
    log.info("extracting features of %d images (frozen backbone, %s)", len(pairs), extract.engine)
    features = read_features(pairs, opts.data_dir, prev.prep, extract, opts.skip_bad_images, opts.progress)
    graph = prev.backbone_graph
    if graph is None and isinstance(extract, BackboneFeatures):
        graph = extract.graph
    return features, graph


def _check_holdout(opts: UpdateOptions, config: ModelConfig) -> None:
    if opts.holdout_by not in ("seeded", "content") or (opts.holdout_by == "content" and config.analytic):
        # an analytic update holds features, not pixels, and features are not a stable key (another
        # onnxruntime may round them differently)
        raise UsageError(f"holdout_by {opts.holdout_by!r}: 'seeded', or 'content' for a gradient store's images")


def _holdout(data: ImageSet | FeatureSet, opts: UpdateOptions) -> tuple[ImageSet | FeatureSet, ImageSet | FeatureSet]:
    """(training, held-out) parts of an update's images, as ``opts.holdout_by`` says (checked by
    :func:`_check_holdout`: "content" only reaches here with a gradient store's pixels)."""
    if opts.holdout_by == "content" and isinstance(data, ImageSet):
        keys = [data.pixels[i].tobytes() for i in range(len(data))]
        train_idx, val_idx = content_holdout_indices(keys, data.labels, opts.holdout)
        return data.subset(train_idx), data.subset(val_idx)
    return holdout_split(data, opts.holdout, opts.seed)


def _log_update_kind(kind: str, new_classes: Sequence[int], revisited: Sequence[int], names: Sequence[str]) -> None:
    label = lambda cs: ", ".join(names[c] for c in cs) or "none"  # noqa: E731
    log.info(
        "%s update: %d new class(es) (%s), %d known class(es) with new images (%s)",
        kind,
        len(new_classes),
        label(new_classes),
        len(revisited),
        label(revisited),
    )
