"""What each fleet round did: published or not, lambda, accuracy per device on its own held-out
images, bytes each way and wall time. Kept as ``<coordinator>/fleet/rounds.json``, printed as a
matrix (rows: rounds; columns: devices)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet import state as st


@dataclasses.dataclass(frozen=True)
class RoundReport:
    round: int
    version: int | None
    published: bool
    relative_lambda: float | None = None
    fleet_accuracy: float | None = None  # balanced, on the union of the devices' held-out images
    device_accuracy: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    left_out: Mapping[str, str] = dataclasses.field(default_factory=dict)
    not_scored: Mapping[str, str] = dataclasses.field(default_factory=dict)  # merged, but no lambda votes
    upload_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    download_bytes: int = 0  # per device: the fleet's statistics (float64) and the table
    devices_published: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    step_s: Mapping[str, float] = dataclasses.field(default_factory=dict)  # per message step, slowest device
    classes: int = 0
    images: int = 0
    reason: str = ""

    @staticmethod
    def refused(rnd: int, reason: str, refused: Mapping[str, str] | None = None) -> RoundReport:
        return RoundReport(round=rnd, version=None, published=False, left_out=dict(refused or {}), reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_rounds(workdir: Path) -> list[dict[str, Any]]:
    return list(st.load_json(st.fleet_dir(workdir) / "rounds.json") or [])


def save_rounds(workdir: Path, earlier: Sequence[dict[str, Any]], reports: Sequence[RoundReport]) -> None:
    """Every round attempt the coordinator made: the earlier runs' and this run's."""
    st.save_json(st.fleet_dir(workdir) / "rounds.json", [*earlier, *[r.to_dict() for r in reports]])


def matrix_text(reports: Sequence[RoundReport]) -> str:
    devices = sorted({d for r in reports for d in r.device_accuracy} | {d for r in reports for d in r.left_out})
    pct = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    short = [d[-14:] for d in devices]
    lines = ["round  fleet   " + "  ".join(f"{s:>14}" for s in short) + "   up MB/device  wall s"]
    for r in reports:
        if not r.published:
            lines.append(f"{r.round:>5}  nothing published: {r.reason}")
            continue
        cells = []
        for d in devices:
            if d in r.left_out:
                cells.append(f"{'left out':>14}")
            else:
                cells.append(f"{pct(r.device_accuracy.get(d)):>14}")
        up = max(r.upload_bytes.values(), default=0) / 1e6
        lines.append(f"{r.round:>5}  {pct(r.fleet_accuracy)}  " + "  ".join(cells) + f"   {up:12.2f}  {r.wall_s:6.1f}")
    return "\n".join(lines)


def print_matrix(reports: Sequence[RoundReport]) -> None:
    print("fleet accuracy on each device's held-out images (balanced), after each round:")
    print(matrix_text(reports))
    for r in reports:
        if r.step_s:
            print(f"  round {r.round} steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.step_s.items()))
        for d, why in r.left_out.items():
            print(f"  round {r.round}: {d} left out: {why}")
