"""``cvm init`` and ``cvm update``: create the store, then learn new classes without forgetting."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge.analytic import DEFAULT_DIM
from cvm_edge.analytic_learner import AnalyticState
from cvm_edge.backbone_graph import checked_graph, graph_width
from cvm_edge.backbones import check_image_size
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.checkpoints import DEFAULT_KEEP_VERSIONS, Checkpoint, CheckpointStore, version_name
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet, content_holdout_indices, holdout_split, list_labelled_files, load_image_folder
from cvm_edge.display import printable
from cvm_edge.errors import ConceptError, ForgettingGateError, StoreError, UsageError
from cvm_edge.evaluate import classes_from_logits, mean_over, trained_classes
from cvm_edge.frozen_features import BackboneFeatures, FeatureSet, GraphFeatures, decode_files, read_features
from cvm_edge.fsutil import FileLock, fault_point
from cvm_edge.memory import release_freed_memory
from cvm_edge.model import (
    DEFAULT_PROTOTYPE_TEMPERATURE,
    DEFAULT_ROUTING_TEMPERATURE,
    CvmModel,
    ModelConfig,
    build_head_model,
    build_model,
)
from cvm_edge.plugins import PluginOptions, make_plugins
from cvm_edge.preprocess import Preprocessing
from cvm_edge.similarity import class_vectors, task_similarity
from cvm_edge.strategy import Strategy, TrainConfig, predict_logits

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 500


def model_from_checkpoint(ckpt: Checkpoint) -> CvmModel:
    return _loaded(ckpt, lambda: build_model(ckpt.model_config, ckpt.table.as_float32()), ckpt.weights)


def head_from_checkpoint(ckpt: Checkpoint) -> CvmModel:
    """The model of a store that keeps its backbone graph, without the backbone (no timm): features
    in, logits out (cvm_edge.model.FeatureInput). Its backbone runs in onnxruntime."""
    graph = ckpt.backbone_graph
    if graph is None:
        raise StoreError(f"checkpoint v{ckpt.version} keeps no backbone graph")
    head = {k: v for k, v in ckpt.weights.items() if not k.startswith("backbone.")}
    return _loaded(ckpt, lambda: build_head_model(ckpt.model_config, ckpt.table.as_float32(), graph_width(graph)), head)


def _loaded(ckpt: Checkpoint, build: Callable[[], CvmModel], weights: dict[str, torch.Tensor]) -> CvmModel:
    """``build()`` holding ``weights`` exactly, in eval mode; StoreError when they do not fit."""
    try:
        model = build()
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or an unknown backbone: a store edited by hand
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"checkpoint v{ckpt.version} does not build into a model: {first}") from None
    if missing or unexpected:
        raise StoreError(f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def analytic_model(ckpt: Checkpoint) -> CvmModel:
    """The model an analytic computation on features needs (a solve, a vote, a score): the head alone
    where the store keeps its backbone graph (no timm), else the whole model."""
    return head_from_checkpoint(ckpt) if ckpt.backbone_graph is not None else model_from_checkpoint(ckpt)


def version_weights(prev: Checkpoint, model: CvmModel) -> dict[str, torch.Tensor]:
    """The weights of ``prev``'s next version: ``model``'s, and the frozen backbone's from ``prev``
    where the model was built without it (:func:`head_from_checkpoint`)."""
    backbone = {k: v for k, v in prev.weights.items() if k.startswith("backbone.")}
    return {**backbone, **model.weights_state()}


def graph_to_run(ckpt: Checkpoint, device: str = "cpu") -> bytes | None:
    """The store's backbone graph where an update, export or prediction of ``ckpt`` runs it instead of a
    timm module: analytic stores that keep one, on the CPU (on a GPU the torch module is faster); else None."""
    if ckpt.model_config.analytic and torch.device(device).type == "cpu":
        return ckpt.backbone_graph
    return None


@dataclasses.dataclass(frozen=True)
class InitOptions:
    concepts: Path
    backbone: str
    image_size: int
    train_backbone: str = "all"
    head: str = "concepts"
    mapper_hidden: int = 512
    pretrained: str = "none"
    buffer_size: int = DEFAULT_BUFFER
    seed: int = 0
    prototype_temperature: float = DEFAULT_PROTOTYPE_TEMPERATURE  # multi-prototype tables only
    experts: str = "none"  # per-task experts (cvm_edge.experts): none | adapter
    expert_rank: int = 8
    routing: str = "soft"
    routing_temperature: float = DEFAULT_ROUTING_TEMPERATURE
    expert_shared_mapper: str = "always"
    learner: str = "gradient"  # gradient | analytic (closed form, frozen backbone: cvm_edge.analytic)
    analytic_dim: int = DEFAULT_DIM
    analytic_targets: str = "whitened"
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
    data_dir: Path
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    buffer_size: int | None = None  # None keeps the store's current capacity
    plugins: tuple[str, ...] = ("replay", "distill")
    plugin_options: PluginOptions = dataclasses.field(default_factory=PluginOptions)
    max_forgetting: float = 10.0
    force: bool = False
    seed: int = 0
    holdout: float = 0.2
    # "seeded": a seeded per-class split of this update's images; "content": each image's side follows
    # from its pixels (cvm_edge.data.content_holdout_indices), for a caller that retrains on a folder
    # that keeps growing (a fleet device), so an image once held out is never trained on.
    holdout_by: str = "seeded"
    skip_bad_images: bool = False
    concepts: Path | None = None
    device: str = "cpu"
    augment: bool = True
    progress: bool = True
    loss: str = "ace"
    balance_epochs: int = 3
    keep_versions: int | None = None  # None keeps the store's setting; else it becomes the setting
    channels_last: bool = True  # NHWC: about 2-3x faster CPU training and inference for Lite0 (bench/update.py)
    # A caller's tag, recorded as the version's history entry's "label": written in the same atomic step
    # as the version, so a caller killed after the update can tell from the store whether it landed
    # (a fleet device records which of its files it learnt this way).
    label: str = ""


CLASS_INCREMENTAL, DOMAIN_INCREMENTAL, MIXED = "class-incremental", "domain-incremental", "mixed"


def update_kind(new_classes: Sequence[int], revisited: Sequence[int]) -> str:
    """What an update brings: only new classes, only new images of known classes, or both."""
    if revisited and new_classes:
        return MIXED
    return DOMAIN_INCREMENTAL if revisited else CLASS_INCREMENTAL


def _shown(names: list[str]) -> str:
    """Class names for a terminal: ANSI escapes and newlines in a name are printed escaped."""
    return ", ".join(printable(str(n)) for n in names)


def describe_update(entry: dict[str, Any]) -> str:
    """One line naming an update's new and revisited classes (history entries from before revisited
    classes were recorded read as class-incremental: their ``new_classes`` were all the classes trained)."""
    kind = entry.get("kind", CLASS_INCREMENTAL)
    parts = []
    if entry.get("new_class_names"):
        parts.append(f"new {_shown(entry['new_class_names'])}")
    if entry.get("revisited_class_names"):
        parts.append(f"new images of known {_shown(entry['revisited_class_names'])}")
    return f"update {entry['task']} ({kind}): {'; '.join(parts) or 'no classes'}"


@dataclasses.dataclass(frozen=True)
class UpdateReport:
    version: int | None  # None when nothing was published
    entry: dict[str, Any]
    pruned: tuple[int, ...] = ()  # versions removed after the publish (--keep-versions)

    def summary(self) -> str:
        e = self.entry
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines = [
            f"update {e['task']} ({e['kind']}): {len(e['trained_classes'])} class(es) trained on {e['n_train']} images "
            f"in {e['wall_s']:.1f} s"
        ]
        if e["new_classes"]:
            lines.append(f"  new classes ({_shown(e['new_class_names'])}): {pct(e['new_accuracy'])}")
        rev = e.get("revisited")
        if rev:
            lines.append(
                f"  known classes with new images ({_shown(e['revisited_class_names'])}): on this update's held-out "
                f"images {pct(rev['new_data_before'])} -> {pct(rev['new_data_after'])}, on their earlier held-out "
                f"images {pct(rev['earlier_data_before'])} -> {pct(rev['earlier_data_after'])}"
            )
        lines.append(
            f"  old classes on their earlier held-out images: {pct(e['old_accuracy'])} "
            f"(before this update: {pct(e['old_accuracy_before'])})"
        )
        sim = e.get("similarity") or {}
        if sim.get("at_risk"):  # task similarity (cvm_edge.similarity)
            risky = ", ".join(
                f"{printable(r['class'])} ({r['cosine']:.2f} to {printable(r['nearest_new'])})"
                for r in sim["at_risk"][:3]
            )
            lines.append(f"  old classes most at risk: {risky}; scaling factor {sim['factor']:g}")
        if self.version is not None:
            size = f" ({e['store_mb']:.1f} MB)" if "store_mb" in e else ""
            lines.append(f"  published {version_name(self.version)}{size}")
        if self.pruned:
            lines.append(f"  removed older versions {', '.join(map(version_name, self.pruned))} (--keep-versions)")
        return "\n".join(lines)


class _ValidationScorer:
    """Per-class validation accuracy before and after learning.

    Rows are the earlier updates' held-out images first, then this update's (``n_earlier`` splits
    them). ``predict(keep)`` gives the predicted table rows (among the seen classes) of the rows
    where ``keep``: each learner supplies its own (cached features for a frozen backbone)."""

    def __init__(self, labels: np.ndarray, n_earlier: int, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        self.labels = labels
        self.earlier = np.arange(len(labels)) < n_earlier
        self._predict = predict

    def predict(self, keep: np.ndarray) -> np.ndarray:
        """Predicted table rows of the rows where ``keep``; -1 elsewhere."""
        pred = np.full(len(self.labels), -1, np.int64)
        if keep.any():
            pred[keep] = self._predict(keep)
        return pred

    def rows(self, earlier_classes: Sequence[int], current_classes: Sequence[int]) -> np.ndarray:
        """Earlier held-out rows of ``earlier_classes`` and this update's rows of ``current_classes``."""
        return (self.earlier & np.isin(self.labels, list(earlier_classes))) | (
            ~self.earlier & np.isin(self.labels, list(current_classes))
        )

    def accuracy(self, pred: np.ndarray, classes: Sequence[int], part: str) -> dict[int, float]:
        """Per-class accuracy of ``pred`` on the ``earlier`` or ``current`` rows, or on ``all``."""
        rows = {"earlier": self.earlier, "current": ~self.earlier, "all": np.ones(len(self.labels), bool)}[part]
        out = {}
        for c in classes:
            mask = rows & (self.labels == c)
            if mask.any():
                if (pred[mask] < 0).any():
                    raise AssertionError(f"class {c} was not predicted on the {part} rows")  # a caller's bug
                out[int(c)] = float((pred[mask] == c).mean())
        return out


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
class _Learned:
    """One learner's update: the scorer, predictions before and after, what replaces the previous
    checkpoint's fields, and the learner's own history-entry fields."""

    scorer: _ValidationScorer
    pred_before: np.ndarray
    pred_after: np.ndarray
    checkpoint: dict[str, Any]
    entry: dict[str, Any]


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


def run_update(
    workdir: Path, opts: UpdateOptions, publish_hook: Callable[[int, ImageSet | None], None] | None = None
) -> UpdateReport:
    """Train on ``opts.data_dir`` and publish a new version, or raise with nothing written."""
    store = CheckpointStore(workdir)
    t0 = time.perf_counter()
    with FileLock(store.lock_path, "cvm update"):
        store.clean_stale()
        prev = store.load()
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
        # distill/ewc plugins apply when --similarity-scaling is on (they compute it the same way).
        similarity = task_similarity(class_vectors(table.as_float32()), new_classes, old_classes)
        log.info("task similarity: %s", similarity.summary(table.names))
        if isinstance(train, FeatureSet) and isinstance(val, FeatureSet):
            learned = _learn_analytic(prev, model, table, train, val, seen, old_classes, revisited, opts)
        elif isinstance(train, ImageSet) and isinstance(val, ImageSet):
            learned = _learn_gradient(prev, model, table, train, val, seen, old_classes, revisited, opts)
        else:  # pragma: no cover - _read_update_data returns one kind
            raise TypeError("training and held-out sets of different kinds")
        scorer, pred_before, pred = learned.scorer, learned.pred_before, learned.pred_after
        acc_before = scorer.accuracy(pred_before, old_classes, "earlier")
        revisited_new_before = scorer.accuracy(pred_before, revisited, "current")
        acc = scorer.accuracy(pred, seen, "all")
        acc_earlier = scorer.accuracy(pred, old_classes, "earlier")
        old_before = mean_over(acc_before, old_classes)
        old_after = mean_over(acc_earlier, old_classes)
        entry: dict[str, Any] = {
            "task": len(prev.history) + 1,
            "kind": kind,
            "new_classes": list(new_classes),
            "new_class_names": [table.names[c] for c in new_classes],
            "revisited_classes": list(revisited),
            "revisited_class_names": [table.names[c] for c in revisited],
            "trained_classes": list(trained_classes),
            "revisited": _revisited_figures(
                revisited, revisited_new_before, scorer.accuracy(pred, revisited, "current"), acc_before, acc_earlier
            ),
            "per_class_accuracy": {str(c): round(v, 6) for c, v in acc.items()},
            "old_accuracy_before": old_before,
            "old_accuracy": old_after,
            "new_accuracy": mean_over(acc, new_classes),
            "all_accuracy": mean_over(acc, seen),
            "n_train": len(train),
            "n_val": len(val),
            **learned.entry,
            "images_per_s": learned.entry["images_seen"] / max(1e-9, time.perf_counter() - t0),
            "wall_s": time.perf_counter() - t0,
            "forced": False,
            "similarity": similarity.to_dict(table.names, opts.plugin_options.similarity_scaling),
            **({"label": opts.label} if opts.label else {}),
        }
        gate = forgetting_gate(prev.history, old_classes, acc_before, acc_earlier)
        entry.update(gate.figures())
        worst = max(gate.since_previous, gate.since_learned)
        if worst > opts.max_forgetting:
            if not opts.force:
                raise ForgettingGateError(
                    f"{gate.describe()}, over --max-forgetting {opts.max_forgetting:g}; nothing was published."
                    f"{_worst_drops(gate.reference, acc_earlier, table.names)} Train with replay/distill, or pass --force"
                )
            entry["forced"] = True
            log.warning("old-class accuracy fell by %.1f points; publishing anyway (--force)", worst)
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
        if publish_hook is not None:
            # The export loads the saved version itself: drop this update's images, features and
            # models first, so a device's peak memory is that of the bigger step, not of both.
            # An analytic store keeps no images, so its export checks parity on this update's.
            parity = None if ckpt.val.pixels.size or len(ckpt.buffer) else parity_sample(val, train, ckpt.prep)
            del ckpt, prev, train, val, scorer, model, learned
            release_freed_memory()
            publish_hook(version, parity)
        # Only after LATEST (and, when exporting, CURRENT) moved: what is removed is never what is served.
        pruned = _prune(store, keep)
    return UpdateReport(version=version, entry=entry, pruned=tuple(pruned))


def _prune(store: CheckpointStore, keep: int) -> list[int]:
    """Remove versions beyond the newest ``keep``; a failure here costs disk space, not the update."""
    try:
        return store.prune(keep)
    except (OSError, StoreError) as exc:
        log.warning("published, but older versions could not be removed (%s); the next update retries", exc)
        return []


@dataclasses.dataclass(frozen=True)
class ForgettingGate:
    """Old-class accuracy on earlier held-out images: before this update, when each class was last
    learned (the accuracy matrix's diagonal), and after; the falls since each, in points."""

    before: float | None
    learned: float | None
    after: float | None
    acc_before: dict[int, float]
    acc_learned: dict[int, float]

    @property
    def since_previous(self) -> float:
        return _points(self.before, self.after)

    @property
    def since_learned(self) -> float:
        return _points(self.learned, self.after)

    @property
    def reference(self) -> dict[int, float]:
        return self.acc_before if self.since_previous >= self.since_learned else self.acc_learned

    def figures(self) -> dict[str, float | None]:
        return {
            "old_accuracy_when_learned": self.learned,
            "forgetting_since_previous": round(self.since_previous, 3),
            "forgetting_since_learned": round(self.since_learned, 3),
        }

    def describe(self) -> str:
        since, ref = (
            ("the previous version", self.before)
            if self.since_previous >= self.since_learned
            else ("when they were learned", self.learned)
        )
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        worst = max(self.since_previous, self.since_learned)
        return (
            f"old-class accuracy on earlier held-out images would fall by {worst:.1f} points since {since} "
            f"({pct(ref)} -> {pct(self.after)})"
        )


def forgetting_gate(
    history: Sequence[dict[str, Any]],
    old_classes: Sequence[int],
    acc_before: dict[int, float],
    acc_after: dict[int, float],
) -> ForgettingGate:
    """Both gates' figures: a single step's fall, and the fall since each old class was learned, so
    that several small steps cannot add up to more than --max-forgetting."""
    learned = accuracy_when_learned(history, old_classes)
    return ForgettingGate(
        mean_over(acc_before, old_classes),
        mean_over(learned, old_classes),
        mean_over(acc_after, old_classes),
        acc_before,
        learned,
    )


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


def _points(before: float | None, after: float | None) -> float:
    return 100.0 * (before - after) if before is not None and after is not None else 0.0


def accuracy_when_learned(history: Sequence[dict[str, Any]], classes: Sequence[int]) -> dict[int, float]:
    """Each class's held-out accuracy right after the latest update that trained it."""
    out: dict[int, float] = {}
    for entry in history:
        acc = entry.get("per_class_accuracy", {})
        for c in trained_classes(entry):
            if c in classes and str(c) in acc:
                out[c] = float(acc[str(c)])
    return out


def _learn_gradient(
    prev: Checkpoint,
    model: CvmModel,
    table: ConceptTable,
    train: ImageSet,
    val: ImageSet,
    seen: list[int],
    old_classes: list[int],
    revisited: list[int],
    opts: UpdateOptions,
) -> _Learned:
    """The Strategy's training loop with the configured plugins and the replay buffer."""
    plugins = make_plugins(opts.plugins, opts.plugin_options)
    for p in plugins:
        if p.needs_concept_head and prev.model_config.head != "concepts":
            raise UsageError(
                f"the {p.name} plugin needs the concept head; this store's head is {prev.model_config.head}"
            )
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
    scorer = _ValidationScorer(all_val.labels, len(prev.val), _gradient_predictor(strategy, all_val, seen))
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
    return _Learned(
        scorer,
        pred_before,
        pred_after,
        checkpoint={
            "buffer": result.buffer,
            "val": all_val,
            "plugin_state": {p.name: p.state_dict() for p in plugins},
        },
        entry={
            "learner": "gradient",
            "plugins": list(opts.plugins),
            "epochs": opts.epochs,
            "steps": result.steps,
            "images_seen": result.images_seen,
        },
    )


def _holdout(data: ImageSet | FeatureSet, opts: UpdateOptions) -> tuple[ImageSet | FeatureSet, ImageSet | FeatureSet]:
    """(training, held-out) parts of an update's images, as ``opts.holdout_by`` says."""
    if opts.holdout_by == "seeded":
        return holdout_split(data, opts.holdout, opts.seed)
    if opts.holdout_by != "content" or not isinstance(data, ImageSet):
        # features are not a stable key (another onnxruntime may round them differently)
        raise UsageError(f"holdout_by {opts.holdout_by!r}: 'seeded', or 'content' for a gradient store's images")
    keys = [data.pixels[i].tobytes() for i in range(len(data))]
    train_idx, val_idx = content_holdout_indices(keys, data.labels, opts.holdout)
    return data.subset(train_idx), data.subset(val_idx)


def _learn_analytic(
    prev: Checkpoint,
    model: CvmModel,
    table: ConceptTable,
    train: FeatureSet,
    val: FeatureSet,
    seen: list[int],
    old_classes: list[int],
    revisited: list[int],
    opts: UpdateOptions,
) -> _Learned:
    """Closed form (cvm_edge.analytic_learner) on the features computed while the folder was read
    (one backbone pass): sums added, lambda chosen, solved. No images are kept: the held-out
    images' backbone features are."""
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
    scorer = _ValidationScorer(all_labels, len(state.held_out), predict)
    pred_before = scorer.predict(scorer.rows(old_classes, revisited))
    # The previous version's sums are on disk and replaced by the new ones: G grows in place rather
    # than beside a copy (134 MB at M = 4,096). Nothing reads prev.analytic after this.
    learned = al.learn(
        model, table.as_float32(), state, train_f, train.labels, val_f, val.labels, seen, task, reuse_sums=True
    )
    pred_after = scorer.predict(np.ones(len(all_labels), bool))
    return _Learned(
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


def _revisited_figures(
    revisited: Sequence[int],
    new_before: dict[int, float],
    new_after: dict[int, float],
    earlier_before: dict[int, float],
    earlier_after: dict[int, float],
) -> dict[str, float | None] | None:
    """Mean accuracy of the revisited classes on this update's held-out images (the new domain)
    and on their earlier held-out images (the domains the previous version knew), before and after."""
    if not revisited:
        return None
    return {
        "new_data_before": mean_over(new_before, revisited),
        "new_data_after": mean_over(new_after, revisited),
        "earlier_data_before": mean_over(earlier_before, revisited),
        "earlier_data_after": mean_over(earlier_after, revisited),
    }


def _worst_drops(before: dict[int, float], after: dict[int, float], names: Sequence[str], top: int = 3) -> str:
    drops = sorted(((before[c] - after[c], c) for c in before), reverse=True)[:top]
    listed = ", ".join(f"{names[c]} {100 * before[c]:.0f}% -> {100 * after[c]:.0f}%" for d, c in drops if d > 0)
    return f" Fell most: {listed}." if listed else ""


def status(workdir: Path) -> dict[str, Any]:
    store = CheckpointStore(workdir)
    latest = store.latest()
    keep = store.keep_setting()
    serving = store.serving_version()
    versions = []
    for v in store.versions():
        meta = store.read_meta(v)
        versions.append(
            {
                "version": v,
                "parent": meta.get("parent"),
                "created_at": meta.get("created_at"),
                "classes": len(meta.get("seen", [])),
                "latest": v == latest,
                "serving": v == serving,
                "bytes": store.version_bytes(v),
            }
        )
    meta = store.read_meta(latest)
    graph = None
    if "backbone_graph" in meta:  # kept once for all versions (cvm_edge.backbone_graph), not in their bytes
        path = store.graph_path(meta["backbone_graph"])
        graph = {"sha256": meta["backbone_graph"], "bytes": path.stat().st_size if path.is_file() else None}
    return {
        "keep_versions": keep,
        "backbone_graph": graph,
        "kept_versions": store.kept_versions(keep),
        "workdir": str(workdir),
        "latest": latest,
        "versions": versions,
        "model": meta["model"],
        "preprocessing": meta["preprocessing"],
        "classes": meta.get("seen_names", []),
        "history": meta.get("history", []),
    }
