"""The coordinator's store: a cvm store like a device's (analytic learner, no held-out images; or for
the gradient merges a gradient store on a frozen backbone, whose concept head is the fleet's model),
the fleet's append-only concept table beside it, and which upload of each device it merged last."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge import analytic_learner as al
from cvm_edge.analytic import HeldOut, RidgeStats, class_targets, solve
from cvm_edge.checkpoints import Checkpoint, CheckpointStore
from cvm_edge.concepts import ConceptTable
from cvm_edge.errors import ConceptError, StoreError, UsageError
from cvm_edge.fsutil import FileLock, atomic_write_bytes, read_regular
from cvm_edge.loading import analytic_model
from cvm_edge.update import InitOptions, init_store
from fleet import state as st
from fleet.average import MOMENTUM_KEY, ExpectedWeights, Weights, WeightsMerge, head_weights
from fleet.base import base_description, base_fingerprint, fleet_version, weights_version
from fleet.fused import PLUGIN_KEY, feature_width, fusion_state, head_parameters
from fleet.merge import RoundMerge
from fleet.wire import Expected

log = logging.getLogger(__name__)

MAX_TABLE_BYTES = 256 << 20
LEARNERS = ("analytic", "gradient")  # analytic: --merge analytic; gradient: --merge fedavg | fusion


def init_coordinator(workdir: Path, opts: InitOptions) -> int:
    """Version 1 of the coordinator's store, and the fleet's table (the store's, to start)."""
    if opts.learner not in LEARNERS:
        raise UsageError(f"a fleet merges analytic or gradient stores (--learner {' or '.join(LEARNERS)})")
    if opts.learner == "gradient" and (
        opts.train_backbone != "none" or opts.head != "concepts" or opts.experts != "none"
    ):
        raise UsageError("a gradient fleet trains the concept head on a frozen backbone: --train-backbone none")
    table = ConceptTable.load(opts.concepts)
    if table.is_multi_prototype:
        raise UsageError("fleet tables have one row per class: build the table without prototypes")
    version = init_store(workdir, opts)
    _save_table(Path(workdir), table)
    return version


def _table_path(workdir: Path) -> Path:
    return st.fleet_dir(workdir) / "table.npz"


def _save_table(workdir: Path, table: ConceptTable) -> None:
    path = _table_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, table.to_bytes())


class Coordinator:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.store = CheckpointStore(self.workdir)

    def latest(self) -> Checkpoint:
        ckpt = self.store.load()
        if ckpt.analytic is None and (
            ckpt.model_config.learner != "gradient" or ckpt.model_config.train_backbone != "none"
        ):
            raise StoreError(f"{self.workdir} is not a fleet coordinator's store; create it with `cvm fleet init`")
        return ckpt

    def learner(self) -> str:
        """analytic (merged with --merge analytic) or gradient (--merge fedavg | fusion)."""
        return "analytic" if self.latest().analytic is not None else "gradient"

    def table(self) -> ConceptTable:
        path = _table_path(self.workdir)
        try:
            table = ConceptTable.from_bytes(read_regular(path, MAX_TABLE_BYTES), str(path))
        except (OSError, ValueError, ConceptError) as exc:
            raise StoreError(f"the fleet's concept table {path} cannot be read: {exc}") from None
        if not self.latest().table.is_prefix_of(table):
            raise StoreError(f"{path} does not extend the coordinator's published table")
        return table

    def base(self) -> tuple[dict[str, Any], str]:
        ckpt = self.latest()
        return base_description(ckpt), base_fingerprint(ckpt)

    def expected(self, table: ConceptTable) -> Expected:
        ckpt = self.latest()
        assert ckpt.analytic is not None
        return Expected(base_fingerprint(ckpt), table.fingerprint, len(table.names), ckpt.analytic.stats.dim)

    def merged_ids(self) -> dict[str, str]:
        """Which upload of each device the published versions hold. Kept in each fleet version's own
        history entry, so it is written in one atomic step with the statistics it describes: a
        separate file written after the version was lost by a kill between the two writes, the
        device then discarded its merged upload and sent it again (counted twice)."""
        merged: dict[str, str] = {}
        for e in self.latest().history:
            if e.get("kind") == "fleet":
                merged.update(e.get("merged_ids") or {})
        return merged

    def extend(self, names: Sequence[str]) -> ConceptTable:
        """Append class names that devices asked for (rows never move), embedded with the table's own
        text model, and keep the table."""
        from llm_embeddings.build import extend_table
        from llm_embeddings.classfile import ClassSpec
        from llm_embeddings.encoder import load_encoder

        table = self.table()
        new = [n for n in dict.fromkeys(names) if table.lookup(n) is None]
        if not new:
            return table
        with FileLock(self.store.lock_path, "cvm fleet coordinator"):
            table = extend_table(table, [ClassSpec(name=n) for n in new], load_encoder())
            _save_table(self.workdir, table)
        log.info("the fleet's table now has %d classes (added %s)", len(table.names), ", ".join(new))
        return table

    def publish(
        self,
        merge: RoundMerge,
        table: ConceptTable,
        relative_lambda: float,
        entry: Mapping[str, Any],
    ) -> int:
        """The fleet's statistics solved at ``relative_lambda``, as the coordinator store's next version."""
        with FileLock(self.store.lock_path, "cvm fleet coordinator"):
            self.store.clean_stale()  # what a writer killed mid-publish left behind
            prev = self.latest()
            model = analytic_model(prev)  # the head alone where the store keeps its backbone graph
            if table.fingerprint != prev.table.fingerprint:
                model.set_table(table.as_float32())
            targets = class_targets(table.as_float32(), prev.model_config.analytic_targets)
            al.analytic_mapper(model).set_weight(solve(merge.stats, targets, relative_lambda))
            assert prev.analytic is not None
            state = al.AnalyticState(
                merge.stats, HeldOut.empty(prev.analytic.held_out.features.shape[1]), prev.analytic.projection_digest
            )
            ckpt = fleet_version(
                prev, table, model, state, relative_lambda, {**entry, "merged_ids": dict(merge.merged_ids)}
            )
            version = self.store.save(ckpt)
        return version

    def rounds_done(self) -> int:
        return sum(1 for e in self.latest().history if e.get("kind") == "fleet")

    def stats(self) -> RidgeStats:
        ckpt = self.latest()
        assert ckpt.analytic is not None
        return ckpt.analytic.stats

    # ----- gradient fleets (--merge fedavg | fusion) ---------------------------------------------
    def weights(self) -> Weights:
        """The fleet's published head weights: what every device starts its next local update from."""
        return head_weights(self.latest().weights)

    def momentum(self, ckpt: Checkpoint | None = None) -> Weights | None:
        """The move of the fedavg round that published the fleet's weights (``ckpt``, default the
        latest): FedAvgM's momentum for the next round (``fleet.average.fedavgm``); None when that
        version came from no fedavg round."""
        state = (ckpt or self.latest()).plugin_state.get(MOMENTUM_KEY)
        return head_weights(state) if state else None  # the move is keyed like the head's weights

    def expected_weights(self, table: ConceptTable) -> ExpectedWeights:
        ckpt = self.latest()
        weights = head_weights(ckpt.weights)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        return ExpectedWeights(
            base_fingerprint(ckpt), table.fingerprint, len(table.names), shapes, feature_width(weights)
        )

    def publish_weights(self, merge: WeightsMerge, table: ConceptTable, entry: Mapping[str, Any]) -> int:
        """The merged head weights as the coordinator store's next version (the atomic store path)."""
        with FileLock(self.store.lock_path, "cvm fleet coordinator"):
            self.store.clean_stale()
            prev = self.latest()
            images = {**entry, "images_seen": int(sum(merge.images.values()))}
            ckpt = weights_version(prev, table, merge.weights, merge.seen, images)
            # A fusion round also keeps each device's mask, rescale and routing prototype (fleet.fused),
            # for `cvm export --experimental --fusion-routing top-k`; any other round drops an earlier round's.
            # A fedavg round keeps its move (the next round's server momentum); any other drops it.
            plugins = {k: v for k, v in prev.plugin_state.items() if k not in (PLUGIN_KEY, MOMENTUM_KEY)}
            if merge.momentum is not None:
                plugins[MOMENTUM_KEY] = {
                    k: torch.from_numpy(np.array(v, np.float32)) for k, v in merge.momentum.items()
                }
            width = feature_width(head_weights(prev.weights)) if merge.unified is not None else None
            state = fusion_state(merge, head_parameters(prev, table, width)) if width is not None else None
            if state is not None:
                plugins[PLUGIN_KEY] = state.to_tensors()
            return self.store.save(dataclasses.replace(ckpt, plugin_state=plugins))
