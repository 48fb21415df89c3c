"""A fleet device: its own cvm store, driven through the product's code (``cvm_edge.update``).

Bookkeeping (``<workdir>/fleet/``) so that nothing is counted twice or lost when a round fails:
- ``known.npz``: the statistics, in this store's terms, that the coordinator already holds;
- ``pending.npz`` + ``pending.json``: what the last upload brought the coordinator up to, until the
  coordinator says whether it merged it;
- ``staged.npz`` + ``staged.json``: the fleet's statistics received for scoring, until published.
An upload is ``latest - known``. Publishing the fleet's statistics G keeps what this device learnt
after its upload: the new store holds ``G + (latest - X)``, X being what G already contains of it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvm_edge import analytic_learner as al
from cvm_edge.analytic import HeldOut, RidgePath, RidgeStats, class_targets, solve
from cvm_edge.checkpoints import Checkpoint, CheckpointStore
from cvm_edge.concepts import ConceptTable
from cvm_edge.data import load_image_folder
from cvm_edge.errors import CvmError, StoreError
from cvm_edge.fsutil import FileLock
from cvm_edge.loading import analytic_model
from cvm_edge.update import PARITY_SAMPLE, UpdateOptions, run_update
from cvm_edge.update_report import UpdateReport
from fleet import state as st
from fleet.base import base_fingerprint, fleet_version, init_on_base
from fleet.merge import Votes
from fleet.wire import pack_stats, stats_digest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Upload:
    arrays: dict[str, np.ndarray]
    contribution_id: str
    base: str
    table: str
    images: int  # images behind these statistics


class StoreDevice:
    """One device's side of a round, on the store at ``workdir``; ``data_dir`` holds the images it
    learns locally (class folders, as for ``cvm update``)."""

    def __init__(self, workdir: Path, data_dir: Path | None = None, max_forgetting: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.max_forgetting = max_forgetting
        self.data_dir = Path(data_dir) if data_dir else None
        self.store = CheckpointStore(self.workdir)
        self.dir = st.fleet_dir(self.workdir)

    # ----- sync -------------------------------------------------------------------------------
    def sync(self, base: dict[str, Any], table: ConceptTable, merged_id: str | None) -> list[str]:
        """Settle the last upload (merged or not), create the store on the fleet's base if there is
        none, and return the class names of the local data that the fleet's table lacks."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.store.lock_path, "cvm fleet device"):
            self._finish_publish()
            self._settle(merged_id)
        if not self.store.exists():
            self._init(base, table)  # init_store takes the lock itself and refuses a store that exists
        return self.wanted(table)

    def _finish_publish(self) -> None:
        """Finish the bookkeeping of a publish killed after its version was saved: the staged fleet
        statistics are what the coordinator holds (the version's entry names their digest)."""
        if not self.store.exists():
            return
        ckpt = self.store.load()
        fleet_entries = [e for e in ckpt.history if e.get("kind") == "fleet"]
        known = st.load_json(self.dir / "known.json") or {}
        if not fleet_entries or fleet_entries[-1].get("fleet_round", 0) <= int(known.get("fleet_round", 0)):
            return
        entry = fleet_entries[-1]
        staged = st.load_json(self.dir / "staged.json") or {}
        fleet = st.load_stats(self.dir / "staged.npz")
        if fleet is None or not entry.get("fleet_digest") or staged.get("digest") != entry["fleet_digest"]:
            return  # nothing to finish with: the upload refuses (_check_known_is_current)
        if stats_digest(fleet) != entry["fleet_digest"]:
            return
        self._record_published(fleet, int(entry["fleet_round"]), None)
        log.info("finished the bookkeeping of fleet round %s's publish (interrupted)", entry["fleet_round"])

    def _record_published(self, fleet: RidgeStats, fleet_round: int, version: int | None) -> None:
        # The pending upload is inside the published version (X was subtracted): it goes first, so
        # that no crash leaves it to be settled as known after known.npz already holds the fleet's.
        for name in ("pending.json", "pending.npz"):
            st.remove(self.dir / name)
        # known.npz pairs with the version through known.json: were known.json not written (a crash
        # here), the next sync finishes it from the staged statistics, or the upload refuses
        st.save_stats(self.dir / "known.npz", fleet)
        st.save_json(self.dir / "known.json", {"fleet_round": fleet_round, "version": version})
        for name in ("staged.npz", "staged.json"):
            st.remove(self.dir / name)

    def _settle(self, merged_id: str | None) -> None:
        pending = st.load_json(self.dir / "pending.json")
        if pending is None:
            return
        if merged_id is not None and pending.get("id") == merged_id:
            stats = st.load_stats(self.dir / "pending.npz")
            if stats is None:
                raise StoreError(f"{self.dir}/pending.npz is missing")
            st.save_stats(self.dir / "known.npz", stats)
        st.remove(self.dir / "pending.json")
        st.remove(self.dir / "pending.npz")

    def _init(self, base: dict[str, Any], table: ConceptTable) -> None:
        init_on_base(self.workdir, base, table, "analytic")
        log.info("created the store on the fleet's base in %s", self.workdir)

    # ----- local learning --------------------------------------------------------------------
    def _settle_learning(self) -> None:
        """Finish the bookkeeping of a local update that a kill interrupted: ``learning.json`` names
        the files of an update in flight and its label; the update landed iff a version's history
        holds that label (written in the same atomic step as the version)."""
        intent = st.load_json(self.dir / "learning.json")
        if intent is None:
            return
        # meta.json alone (schema-checked on read): the history, without loading the weights
        history = self.store.read_meta(self.store.latest()).get("history", []) if self.store.exists() else []
        if any(isinstance(e, dict) and e.get("label") == intent.get("label") for e in history):
            done = st.load_json(self.dir / "learned.json") or {}
            st.save_json(self.dir / "learned.json", {**done, **dict(intent.get("files") or {})})
        st.remove(self.dir / "learning.json")

    def _new_files(self) -> dict[str, int]:
        files = image_files(self.data_dir)
        if not files:
            return {}
        self._settle_learning()
        done = st.load_json(self.dir / "learned.json") or {}
        return {k: v for k, v in files.items() if done.get(k) != v}

    def wanted(self, table: ConceptTable) -> list[str]:
        classes = sorted({k.split("/", 1)[0] for k in self._new_files()})
        return [n for n in classes if table.lookup(n) is None]

    def learn(self, table: ConceptTable) -> dict[str, Any] | None:
        """``cvm update`` on the local images not learned yet (each image is learned once), on the
        fleet's table. The images are copied into a scratch folder first, so the data folder may
        keep growing while the update runs."""
        new = self._new_files()
        if not new:
            return None
        assert self.data_dir is not None
        label = f"fleet-learn-{uuid.uuid4().hex}"
        st.save_json(self.dir / "learning.json", {"label": label, "files": new})
        report = update_from_copy(
            self.workdir, self.data_dir, new, table, max_forgetting=self.max_forgetting, label=label
        )
        self._settle_learning()
        return report.entry

    # ----- upload ----------------------------------------------------------------------------
    def fingerprints(self) -> tuple[str, str]:
        ckpt = self.store.load()
        return base_fingerprint(ckpt), ckpt.table.fingerprint

    def upload(self, wire_dtype: str, table: ConceptTable) -> Upload:
        """What this store learnt since the coordinator last took its statistics, over the rows of
        the fleet's ``table`` (this store's table must be a prefix of it: rows never move)."""
        with FileLock(self.store.lock_path, "cvm fleet device"):
            ckpt = self.store.load()
            if not ckpt.table.is_prefix_of(table):
                raise StoreError(
                    f"this store's concept table ({ckpt.table.fingerprint[:12]}) is not a prefix of the fleet's "
                    f"({table.fingerprint[:12]}): its rows would not mean the fleet's classes"
                )
            latest = _stats(ckpt).grown(len(table.names))
            _check_known_is_current(ckpt, st.load_json(self.dir / "known.json"))
            known = (st.load_stats(self.dir / "known.npz") or RidgeStats.empty(latest.dim, 0)).grown(latest.rows)
            delta = RidgeStats(
                latest.gram - known.gram, latest.class_sums - known.class_sums, latest.counts - known.counts
            )
            cid = hashlib.sha256(f"{stats_digest(latest)}:{stats_digest(known)}".encode()).hexdigest()[:32]
            st.save_stats(self.dir / "pending.npz", latest)
            st.save_json(self.dir / "pending.json", {"id": cid})
        return Upload(
            pack_stats(delta, wire_dtype), cid, base_fingerprint(ckpt), table.fingerprint, int(delta.counts.sum())
        )

    # ----- score and publish -----------------------------------------------------------------
    def score(self, fleet: RidgeStats, table: ConceptTable, grid: Sequence[float]) -> Votes:
        """Stage the fleet's statistics and tally this device's held-out images for each lambda."""
        ckpt = self.store.load()
        held = _held_out(ckpt)
        votes = tally(_model(ckpt, table), table, ckpt.model_config.analytic_targets, fleet, held, grid)
        correct, total = votes.correct, votes.total
        # Kept with the staged statistics: at publish, this device's own held-out accuracy at the chosen
        # lambda becomes its classes' reference for the forgetting gate of later local updates.
        st.save_stats(self.dir / "staged.npz", fleet)
        st.save_json(
            self.dir / "staged.json",
            {
                "digest": stats_digest(fleet),
                "lambdas": list(grid),
                "correct": correct.tolist(),
                "total": total.tolist(),
            },
        )
        return Votes(correct, total)

    def publish(
        self, digest: str, relative_lambda: float, merged: bool, table: ConceptTable, entry: dict[str, Any]
    ) -> dict[str, Any]:
        """Publish the staged fleet statistics solved at ``relative_lambda`` as a new version, then
        export its bundle (the server keeps the old one until the new one passes parity)."""
        with FileLock(self.store.lock_path, "cvm fleet device"):
            self.store.clean_stale()
            fleet = st.load_stats(self.dir / "staged.npz")
            staged = st.load_json(self.dir / "staged.json") or {}
            if fleet is None or staged.get("digest") != digest or stats_digest(fleet) != digest:
                raise StoreError("the staged fleet statistics are missing or not the ones the coordinator published")
            prev = self.store.load()
            latest = _stats(prev).grown(fleet.rows)
            pending = st.load_stats(self.dir / "pending.npz") if merged else None
            known = st.load_stats(self.dir / "known.npz")
            x = (pending or known or RidgeStats.empty(latest.dim, 0)).grown(fleet.rows)
            new = fleet.merged(
                RidgeStats(latest.gram - x.gram, latest.class_sums - x.class_sums, latest.counts - x.counts)
            )
            model = _model(prev, table)
            # One direct solve (a few times cheaper than the eigendecomposition the scoring needed).
            targets = class_targets(table.as_float32(), prev.model_config.analytic_targets)
            al.analytic_mapper(model).set_weight(solve(new, targets, relative_lambda))
            own = _own_accuracy(staged, relative_lambda)
            assert prev.analytic is not None
            seen = tuple(int(c) for c in np.flatnonzero(new.counts))
            state = al.AnalyticState(new, prev.analytic.held_out, prev.analytic.projection_digest)
            own_fields = {
                "unknown_threshold": al.unknown_threshold(model, state, seen),
                **entry,
                # This device's classes (those it holds held-out images of) on its own held-out images:
                # the fleet's model is their new reference for the forgetting gate.
                "trained_classes": sorted(own),
                "per_class_accuracy": {str(c): round(a, 6) for c, a in own.items()},
                "fleet_per_class_accuracy": entry.get("per_class_accuracy", {}),
                "fleet_digest": digest,  # the staged statistics this version holds (see _finish_publish)
            }
            ckpt = fleet_version(prev, table, model, state, relative_lambda, own_fields)
            version = self.store.save(ckpt)
            self._record_published(fleet, int(ckpt.history[-1].get("fleet_round", 0)), version)
        exported = self._export(version, table)  # export_bundle takes the store's lock itself
        return {"version": version, "exported": exported, "classes": len(seen)}

    def _export(self, version: int, table: ConceptTable) -> str:
        return export_version(self.workdir, self.data_dir, version, table)


# Local images a device's publish checks its export's parity on: as many as `cvm update`'s own export
# (the gate's minimum); 256 cost ~4 s more of each device's publish on 2 cores.
PARITY_IMAGES = PARITY_SAMPLE


def image_files(data_dir: Path | None) -> dict[str, int]:
    """Regular image files of a data folder (class folder/name -> size); links are skipped. None or
    a folder that is not there: none (a device may run without local data)."""
    out: dict[str, int] = {}
    if data_dir is None or not data_dir.is_dir():
        return out
    for cls in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        for f in sorted(cls.iterdir()):
            if f.is_file() and not f.is_symlink() and not f.name.startswith("."):
                out[f"{cls.name}/{f.name}"] = f.stat().st_size
    return out


def export_version(workdir: Path, data_dir: Path | None, version: int, table: ConceptTable) -> str:
    """Export ``version``'s bundle through the product's path, checking parity on a seeded sample of
    the local images; the server keeps the previous bundle until the new one passes."""
    from deploy.export import ON_DEVICE, export_bundle

    files = sorted(image_files(data_dir))
    if not files:
        return "not exported: no local images to check parity on"
    assert data_dir is not None
    pick = np.random.default_rng(version).permutation(len(files))[:PARITY_IMAGES]
    ckpt = CheckpointStore(workdir).load(version)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = copy_files(data_dir, [files[i] for i in sorted(pick)], Path(tmp) / "data")
            images = load_image_folder(data, table, ckpt.prep, skip_bad=True, progress=False)
        return export_bundle(workdir, version, ON_DEVICE, images=images).summary()
    except CvmError as exc:
        return f"not exported ({exc}); the server keeps the previous bundle"


def update_from_copy(
    workdir: Path, data_dir: Path, files: Iterable[str], table: ConceptTable, **options: Any
) -> UpdateReport:
    """``cvm update`` of ``workdir`` on a scratch copy of ``data_dir``'s ``files`` (so the folder may
    keep growing while the update runs), on the fleet's ``table``; ``options``: UpdateOptions fields."""
    with tempfile.TemporaryDirectory() as tmp:
        data = copy_files(data_dir, list(files), Path(tmp) / "data")
        path = Path(tmp) / "table.npz"
        table.save(path)
        return run_update(workdir, UpdateOptions(data_dir=data, concepts=path, progress=False, **options))


def copy_files(src: Path, rels: Sequence[str], dst: Path) -> Path:
    """Copies of ``src``'s ``class/file`` entries under ``dst`` (a scratch folder the update reads)."""
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    return dst


def _check_known_is_current(ckpt: Checkpoint, known: dict[str, Any] | None) -> None:
    rounds = [e.get("fleet_round") for e in ckpt.history if e.get("kind") == "fleet"]
    newest = max((r for r in rounds if isinstance(r, int)), default=0)
    if newest > int((known or {}).get("fleet_round", 0)):
        raise StoreError(
            "this store published a fleet version whose statistics were not recorded as known (a crash between the "
            "two writes); uploading now would count the fleet's images twice. Start this device from a fresh workdir"
        )


def _stats(ckpt: Checkpoint) -> RidgeStats:
    if ckpt.analytic is None:
        raise StoreError(f"{ckpt.version}: a fleet device needs an analytic store (`cvm init --learner analytic`)")
    return ckpt.analytic.stats.grown(len(ckpt.table.names))


@torch.no_grad()
def tally(
    model: Any, table: ConceptTable, targets: str, fleet: RidgeStats, held: HeldOut, grid: Sequence[float]
) -> Votes:
    """Correct predictions per class of the held-out features ``held`` for each lambda of ``grid``,
    with the fleet's statistics solved once (one eigendecomposition) and ``model``'s head."""
    rows = fleet.rows
    correct = np.zeros((len(grid), rows), np.int64)
    total = np.bincount(held.labels, minlength=rows)[:rows].astype(np.int64)
    if len(held):
        path = RidgePath.of(fleet, class_targets(table.as_float32(), targets))
        h = al.lifted(model, held.features.astype(np.float32))
        seen = [int(c) for c in np.flatnonzero(fleet.counts)]
        for i, lam in enumerate(grid):
            pred = al.rows_from_outputs(model, h @ path.solve(lam), seen)
            correct[i] = np.bincount(held.labels[pred == held.labels], minlength=rows)[:rows]
    return Votes(correct, total)


def _own_accuracy(staged: dict[str, Any], relative_lambda: float) -> dict[int, float]:
    lambdas = [float(x) for x in staged.get("lambdas", [])]
    if relative_lambda not in lambdas:
        return {}
    correct = staged["correct"][lambdas.index(relative_lambda)]
    return {c: correct[c] / n for c, n in enumerate(staged["total"]) if n > 0}


def _held_out(ckpt: Checkpoint) -> HeldOut:
    assert ckpt.analytic is not None
    return ckpt.analytic.held_out


@torch.no_grad()
def _model(ckpt: Checkpoint, table: ConceptTable) -> Any:
    if not ckpt.table.is_prefix_of(table):
        raise StoreError(f"the fleet's concept table does not extend this store's ({ckpt.table.fingerprint[:12]})")
    model = analytic_model(ckpt)
    if table.fingerprint != ckpt.table.fingerprint:
        model.set_table(table.as_float32())
    return model
