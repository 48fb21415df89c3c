"""A gradient fleet's device (``--merge fedavg | fusion``): its own cvm store on the fleet's frozen
backbone, trained by the product's own ``cvm update`` (``cvm_edge.update.run_update``, the gradient
learner: replay, distillation and the forgetting gate as on any device).

A round on the device:
1. ``sync``: create the store on the fleet's base if there is none; name the local classes the
   fleet's table lacks (as ``fleet.device.StoreDevice``).
2. ``train``: make the store's latest version hold the fleet's published weights (a device that
   missed a publish, or a new one, adopts them first), run ``cvm update`` on every local image (each
   round is FedAvg's local epochs over the device's data; the images compete only among the
   device's own classes, ``DEVICE_LOSS``) and upload the concept head's weights with the number of
   training images behind them.
3. ``publish``: save the fleet's merged weights as a new version, export its bundle (the old one
   serves until parity passes) and tally the new model on this device's held-out images."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge.checkpoints import Checkpoint, CheckpointStore
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import ImageSet
from cvm_edge.errors import StoreError
from cvm_edge.evaluate import classes_from_logits
from cvm_edge.fsutil import FileLock
from cvm_edge.loading import model_from_checkpoint
from cvm_edge.strategy import LOCAL_LOSS, predict_logits
from fleet import state as st
from fleet.average import WeightsUpload, head_weights, weights_digest
from fleet.base import base_fingerprint, init_on_base, weights_version
from fleet.device import export_version, image_files, update_from_copy
from fleet.fused import mean_feature
from fleet.merge import Votes

log = logging.getLogger(__name__)

# The classification loss of a device's local update (cvm_edge.strategy.classification_loss): its
# images compete only among its own classes. From round 2 on the fleet's every class is "seen" on
# the device and its own are revisited, so the product's default (ace) would train them against all
# of the fleet's classes and push down the rows of the classes other devices hold, the drift of
# FedAvg under label skew. bench/fleet_gradient.py trains its simulated devices with the same.
DEVICE_LOSS = LOCAL_LOSS


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What the coordinator asks of a device's local ``cvm update`` (Flower's run config)."""

    epochs: int = 1  # FedAvg's local epochs per round
    lr: float = 1e-3  # Adam, the product's default
    batch_size: int = 32
    prototype: bool = False  # fusion: also upload the routing prototype (fleet.fused.mean_feature)


class WeightsDevice:
    """One device of a gradient fleet, on the store at ``workdir``; ``data_dir`` holds its images
    (class folders, as for ``cvm update``)."""

    def __init__(self, workdir: Path, data_dir: Path | None = None, max_forgetting: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.data_dir = Path(data_dir) if data_dir else None
        self.max_forgetting = max_forgetting
        self.store = CheckpointStore(self.workdir)
        self.dir = st.fleet_dir(self.workdir)

    # ----- sync -------------------------------------------------------------------------------
    def sync(self, base: dict[str, Any], table: ConceptTable, merged_id: str | None = None) -> list[str]:
        """Create the store on the fleet's base if there is none; the local classes the table lacks.
        (``merged_id`` is the analytic path's bookkeeping: weights replace, they are never added.)"""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.store.exists():
            self._init(base, table)
        return [n for n in self.classes() if table.lookup(n) is None]

    def _init(self, base: dict[str, Any], table: ConceptTable) -> None:
        init_on_base(self.workdir, base, table, "gradient")
        log.info("created the store on the fleet's base in %s", self.workdir)

    def classes(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in image_files(self.data_dir)})

    def fingerprints(self) -> tuple[str, str]:
        ckpt = self.store.load()
        return base_fingerprint(ckpt), ckpt.table.fingerprint

    # ----- local training and upload ------------------------------------------------------------
    def train(
        self,
        fleet: Mapping[str, np.ndarray],
        seen: Sequence[int],
        table: ConceptTable,
        entry: Mapping[str, Any],
        local: LocalTraining,
    ) -> WeightsUpload:
        """Start from the fleet's weights, run ``cvm update`` on the local images, upload the head."""
        files = image_files(self.data_dir)
        if not files:
            raise StoreError("this device has no local images to train on (--data)")
        assert self.data_dir is not None
        self.adopt(fleet, seen, table, {**entry, "adopted": True})
        report = update_from_copy(
            self.workdir,
            self.data_dir,
            files,
            table,
            epochs=local.epochs,
            lr=local.lr,
            batch_size=local.batch_size,
            max_forgetting=self.max_forgetting,
            loss=DEVICE_LOSS,
            # every round retrains on the whole, growing folder: an image held out once stays held out
            holdout_by="content",
        )
        ckpt = self.store.load(report.version)
        return WeightsUpload(
            device="",  # the coordinator names the device
            base=base_fingerprint(ckpt),
            table=ckpt.table.fingerprint,
            weights=head_weights(ckpt.weights),
            images=int(report.entry["n_train"]),
            seen=tuple(int(c) for c in ckpt.seen),
            prototype=mean_feature(ckpt, self.data_dir, table) if local.prototype else None,
            local=tuple(int(c) for c in report.entry["trained_classes"]),
        )

    def adopt(
        self, fleet: Mapping[str, np.ndarray], seen: Sequence[int], table: ConceptTable, entry: Mapping[str, Any]
    ) -> int | None:
        """Save the fleet's weights as this store's next version unless its latest already holds them
        (a new device, or one that missed a publish); the version number, or None when nothing changed."""
        with FileLock(self.store.lock_path, "cvm fleet device"):
            self.store.clean_stale()
            prev = self.store.load()
            if weights_digest(head_weights(prev.weights)) == weights_digest(fleet) and set(seen) <= set(prev.seen):
                return None
            _check_table(prev, table)
            rows = tuple(sorted({int(c) for c in seen} | set(prev.seen)))
            version = self.store.save(weights_version(prev, table, fleet, rows, entry))
        log.info("adopted the fleet's weights as version %d", version)
        return version

    # ----- publish ----------------------------------------------------------------------------
    def publish(
        self,
        digest: str,
        fleet: Mapping[str, np.ndarray],
        seen: Sequence[int],
        table: ConceptTable,
        entry: Mapping[str, Any],
    ) -> tuple[dict[str, Any], Votes]:
        """The fleet's merged weights as a new version, its bundle exported, and the new model's tally
        on this device's held-out images (one "lambda": the fleet's weights)."""
        if weights_digest(fleet) != digest:
            raise StoreError("the fleet's weights do not match the digest the coordinator published")
        with FileLock(self.store.lock_path, "cvm fleet device"):
            self.store.clean_stale()
            prev = self.store.load()
            _check_table(prev, table)
            rows = tuple(sorted({int(c) for c in seen} | set(prev.seen)))
            # Every round retrains on the same local images, so each update appends the same held-out
            # images again: the fleet's version keeps each once (the store would otherwise grow by a
            # fifth of the local data every round).
            held = unique(prev.val)
            votes = tally(dataclasses.replace(weights_version(prev, table, fleet, rows, entry), val=held))
            own = {int(c): float(votes.correct[0, c] / votes.total[c]) for c in np.flatnonzero(votes.total)}
            fields = {
                **entry,
                "weights_digest": digest,
                # This device's classes on its own held-out images under the fleet's weights: their new
                # reference for the forgetting gate of its later local updates (as an analytic fleet's).
                "trained_classes": sorted(own),
                "per_class_accuracy": {str(c): round(a, 6) for c, a in own.items()},
            }
            version = self.store.save(dataclasses.replace(weights_version(prev, table, fleet, rows, fields), val=held))
        exported = export_version(self.workdir, self.data_dir, version, table)
        return {"version": version, "exported": exported, "classes": len(rows)}, votes


def _check_table(ckpt: Checkpoint, table: ConceptTable) -> None:
    if not ckpt.table.is_prefix_of(table):
        raise StoreError(f"the fleet's concept table does not extend this store's ({ckpt.table.fingerprint[:12]})")


def unique(images: ImageSet) -> ImageSet:
    """``images`` with repeated (pixels, label) rows kept once, in their first order."""
    seen: set[bytes] = set()
    keep = []
    for i in range(len(images)):
        key = hashlib.sha256(images.pixels[i].tobytes() + int(images.labels[i]).to_bytes(8, "little")).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return images.subset(np.asarray(keep, np.int64)) if len(keep) < len(images) else images


@torch.no_grad()
def tally(ckpt: Checkpoint) -> Votes:
    """Correct predictions per class of ``ckpt``'s model on the store's held-out images."""
    rows = len(ckpt.table.names)
    labels = ckpt.val.labels.astype(np.int64)
    total = np.bincount(labels, minlength=rows)[:rows].astype(np.int64)
    correct = np.zeros((1, rows), np.int64)
    if len(labels) and ckpt.seen:
        pred = classes_from_logits(predict_logits(model_from_checkpoint(ckpt), ckpt.prep, ckpt.val.pixels), ckpt.seen)
        correct[0] = np.bincount(labels[pred == labels], minlength=rows)[:rows]
    return Votes(correct, total)
