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

from cvm_edge.backbones import check_image_size
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.checkpoints import Checkpoint, CheckpointStore, version_name
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet, holdout_split, load_image_folder
from cvm_edge.errors import ConceptError, ForgettingGateError, StoreError, UsageError
from cvm_edge.evaluate import classes_from_logits, mean_over
from cvm_edge.fsutil import FileLock, fault_point
from cvm_edge.model import (
    DEFAULT_PROTOTYPE_TEMPERATURE,
    DEFAULT_ROUTING_TEMPERATURE,
    CvmModel,
    ModelConfig,
    build_model,
)
from cvm_edge.plugins import PluginOptions, make_plugins
from cvm_edge.preprocess import Preprocessing
from cvm_edge.similarity import class_vectors, task_similarity
from cvm_edge.strategy import Strategy, TrainConfig, predict_logits

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 500


def model_from_checkpoint(ckpt: Checkpoint) -> CvmModel:
    model = build_model(ckpt.model_config, ckpt.table.as_float32())
    missing, unexpected = model.load_state_dict(ckpt.weights, strict=False)
    if missing or unexpected:
        raise StoreError(f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


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
        )
        return store.save(ckpt)


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
    skip_bad_images: bool = False
    concepts: Path | None = None
    device: str = "cpu"
    augment: bool = True
    progress: bool = True
    loss: str = "ace"
    balance_epochs: int = 3
    channels_last: bool = True  # NHWC: about 2-3x faster CPU training and inference for Lite0 (bench/update.py)


CLASS_INCREMENTAL, DOMAIN_INCREMENTAL, MIXED = "class-incremental", "domain-incremental", "mixed"


def update_kind(new_classes: Sequence[int], revisited: Sequence[int]) -> str:
    """What an update brings: only new classes, only new images of known classes, or both."""
    if revisited and new_classes:
        return MIXED
    return DOMAIN_INCREMENTAL if revisited else CLASS_INCREMENTAL


def describe_update(entry: dict[str, Any]) -> str:
    """One line naming an update's new and revisited classes (history entries from before revisited
    classes were recorded read as class-incremental: their ``new_classes`` were all the classes trained)."""
    kind = entry.get("kind", CLASS_INCREMENTAL)
    parts = []
    if entry.get("new_class_names"):
        parts.append(f"new {', '.join(entry['new_class_names'])}")
    if entry.get("revisited_class_names"):
        parts.append(f"new images of known {', '.join(entry['revisited_class_names'])}")
    return f"update {entry['task']} ({kind}): {'; '.join(parts) or 'no classes'}"


@dataclasses.dataclass(frozen=True)
class UpdateReport:
    version: int | None  # None when nothing was published
    entry: dict[str, Any]

    def summary(self) -> str:
        e = self.entry
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines = [
            f"update {e['task']} ({e['kind']}): {len(e['trained_classes'])} class(es) trained on {e['n_train']} images "
            f"in {e['wall_s']:.1f} s"
        ]
        if e["new_classes"]:
            lines.append(f"  new classes ({', '.join(e['new_class_names'])}): {pct(e['new_accuracy'])}")
        rev = e.get("revisited")
        if rev:
            lines.append(
                f"  known classes with new images ({', '.join(e['revisited_class_names'])}): on this update's held-out "
                f"images {pct(rev['new_data_before'])} -> {pct(rev['new_data_after'])}, on their earlier held-out "
                f"images {pct(rev['earlier_data_before'])} -> {pct(rev['earlier_data_after'])}"
            )
        lines.append(
            f"  old classes on their earlier held-out images: {pct(e['old_accuracy'])} "
            f"(before this update: {pct(e['old_accuracy_before'])})"
        )
        sim = e.get("similarity") or {}
        if sim.get("at_risk"):  # task similarity (cvm_edge.similarity)
            risky = ", ".join(f"{r['class']} ({r['cosine']:.2f} to {r['nearest_new']})" for r in sim["at_risk"][:3])
            lines.append(f"  old classes most at risk: {risky}; scaling factor {sim['factor']:g}")
        if self.version is not None:
            lines.append(f"  published {version_name(self.version)}")
        return "\n".join(lines)


class _ValidationScorer:
    """Per-class validation accuracy before and after training.

    With a frozen backbone the validation features are computed once and only the head is rerun,
    so the old-class gate costs no second backbone pass over the validation set. Rows are the
    earlier updates' held-out images first, then this update's (``n_earlier`` splits them)."""

    def __init__(self, strategy: Strategy, val: ImageSet, seen: list[int], n_earlier: int) -> None:
        self.strategy, self.val, self.seen = strategy, val, seen
        self.earlier = np.arange(len(val)) < n_earlier
        self.feats = strategy.features(val.pixels) if strategy.model.backbone_frozen and len(val) else None

    def predict(self, keep: np.ndarray) -> np.ndarray:
        """Predicted table rows (among the seen classes) of the rows where ``keep``; -1 elsewhere."""
        pred = np.full(len(self.val), -1, np.int64)
        if not keep.any():
            return pred
        if self.feats is not None:
            logits = self.strategy.head_logits(self.feats[torch.from_numpy(keep).to(self.feats.device)])
        else:
            s = self.strategy
            logits = predict_logits(
                s.model, s.prep, self.val.pixels[keep], s.device, s.config.eval_batch(s.prep.image_size)
            )
        pred[keep] = classes_from_logits(logits, self.seen)
        return pred

    def rows(self, earlier_classes: Sequence[int], current_classes: Sequence[int]) -> np.ndarray:
        """Earlier held-out rows of ``earlier_classes`` and this update's rows of ``current_classes``."""
        labels = self.val.labels
        return (self.earlier & np.isin(labels, list(earlier_classes))) | (
            ~self.earlier & np.isin(labels, list(current_classes))
        )

    def accuracy(self, pred: np.ndarray, classes: Sequence[int], part: str) -> dict[int, float]:
        """Per-class accuracy of ``pred`` on the ``earlier`` or ``current`` rows, or on ``all``."""
        rows = {"earlier": self.earlier, "current": ~self.earlier, "all": np.ones(len(self.val), bool)}[part]
        out = {}
        for c in classes:
            mask = rows & (self.val.labels == c)
            if mask.any():
                if (pred[mask] < 0).any():
                    raise AssertionError(f"class {c} was not predicted on the {part} rows")  # a caller's bug
                out[int(c)] = float((pred[mask] == c).mean())
        return out


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


def run_update(workdir: Path, opts: UpdateOptions, publish_hook: Callable[[int], None] | None = None) -> UpdateReport:
    """Train on ``opts.data_dir`` and publish a new version, or raise with nothing written."""
    store = CheckpointStore(workdir)
    t0 = time.perf_counter()
    with FileLock(store.lock_path, "cvm update"):
        store.clean_stale()
        prev = store.load()
        table = _load_table_for_update(prev.table, opts.concepts)
        data = load_image_folder(
            opts.data_dir, table, prev.prep, skip_bad=opts.skip_bad_images, table_hint=str(opts.concepts or "TABLE.npz")
        )
        train, val = holdout_split(data, opts.holdout, opts.seed)
        trained_classes = data.classes
        del data  # train and val are copies: at 224 px the full set is hundreds of MB
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
        device = torch.device(opts.device)

        model = model_from_checkpoint(prev).to(device)
        if table is not prev.table:
            model.set_table(table.as_float32())

        plugins = make_plugins(opts.plugins, opts.plugin_options)
        for p in plugins:
            if p.needs_concept_head and prev.model_config.head != "concepts":
                raise UsageError(
                    f"the {p.name} plugin needs the concept head; this store's head is {prev.model_config.head}"
                )
        for p in plugins:
            if p.name in prev.plugin_state:
                p.load_state_dict(prev.plugin_state[p.name])
        buffer = (
            prev.buffer if opts.buffer_size is None else dataclasses.replace(prev.buffer, capacity=opts.buffer_size)
        )
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
        scorer = _ValidationScorer(strategy, all_val, seen, n_earlier=len(prev.val))
        # Old classes are judged on the held-out images of earlier updates only (for a revisited
        # class: its earlier domains), so an update that ruins what the previous version knew is
        # caught even when it does well on the new images of the same class.
        pred_before = scorer.predict(scorer.rows(old_classes, revisited))
        acc_before = scorer.accuracy(pred_before, old_classes, "earlier")
        revisited_new_before = scorer.accuracy(pred_before, revisited, "current")
        # phase lines: the operator sees where a long update is; the kill tests aim at each phase
        log.info(
            "training on %d images of %d class(es), starting from %s",
            len(train),
            len(trained_classes),
            version_name(prev.version),
        )
        fault_point("update_training")
        result = strategy.train_experience(train, buffer, seen, old_classes, task_index=len(prev.history) + 1)

        pred = scorer.predict(np.ones(len(all_val), bool))
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
            "plugins": list(opts.plugins),
            "epochs": opts.epochs,
            "steps": result.steps,
            "images_per_s": result.images_seen / max(1e-9, time.perf_counter() - t0),
            "wall_s": time.perf_counter() - t0,
            "forced": False,
            "similarity": similarity.to_dict(table.names, opts.plugin_options.similarity_scaling),
        }
        drop = 100.0 * (old_before - old_after) if old_before is not None and old_after is not None else 0.0
        if drop > opts.max_forgetting:
            if not opts.force:
                raise ForgettingGateError(
                    f"old-class accuracy on earlier held-out images would fall by {drop:.1f} points "
                    f"({100 * old_before:.1f}% -> {100 * old_after:.1f}%), over --max-forgetting "  # type: ignore[operator]
                    f"{opts.max_forgetting:g}; nothing was published.{_worst_drops(acc_before, acc_earlier, table.names)} "
                    "Train with replay/distill, or pass --force"
                )
            entry["forced"] = True
            log.warning("old-class accuracy fell by %.1f points; publishing anyway (--force)", drop)
        log.info("trained and evaluated in %.1f s; saving the checkpoint", time.perf_counter() - t0)
        fault_point("update_saving")
        ckpt = dataclasses.replace(
            prev,
            table=table,
            weights=model.weights_state(),
            buffer=result.buffer,
            val=all_val,
            seen=tuple(seen),
            history=(*prev.history, entry),
            plugin_state={p.name: p.state_dict() for p in plugins},
            plugins=tuple(opts.plugins),
        )
        version = store.save(ckpt)
        entry["version"] = version
        if publish_hook is not None:
            # The export loads the saved version itself: drop this update's images, features and
            # models first, so a device's peak memory is that of the bigger step, not of both.
            del ckpt, prev, train, val, all_val, scorer, strategy, model, result, plugins
            publish_hook(version)
    return UpdateReport(version=version, entry=entry)


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
            }
        )
    meta = store.read_meta(latest)
    return {
        "workdir": str(workdir),
        "latest": latest,
        "versions": versions,
        "model": meta["model"],
        "preprocessing": meta["preprocessing"],
        "classes": meta.get("seen_names", []),
        "history": meta.get("history", []),
    }
