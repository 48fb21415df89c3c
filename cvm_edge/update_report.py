"""What an update was and how it is told: its kind, the report ``cvm update`` prints, the one-line
history of ``cvm status`` and the store's status itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvm_edge.checkpoints import CheckpointStore, version_name
from cvm_edge.display import printable

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
        if sim.get("at_risk"):  # task similarity (cvm_edge.lab.similarity)
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
