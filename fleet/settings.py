"""A fleet round's settings (Flower run config keys are the field names with dashes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cvm_edge.analytic import RELATIVE_LAMBDAS
from fleet.average import MERGES
from fleet.wire import WIRE_DTYPES


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    workdir: Path  # the coordinator's store
    rounds: int = 3
    min_devices: int = 1  # a round starts once this many devices are connected
    quorum: float = 1.0  # share of the round's devices that must contribute; below it nothing is published
    wire_dtype: str = "float32"  # uploads: float32 halves the bytes; the coordinator sums in float64
    wait_s: float = 120.0  # how long a round waits for min_devices
    timeout_s: float = 600.0  # how long the coordinator waits for each step's answers
    lambdas: tuple[float, ...] = RELATIVE_LAMBDAS
    # analytic: devices send ridge statistics, the coordinator adds them (exact); fedavg | fusion:
    # devices train their concept head with `cvm update` and send its weights (a gradient fleet)
    merge: str = "analytic"
    local_epochs: int = 1  # fedavg | fusion: epochs of each device's `cvm update` per round

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_devices < 1:
            raise ValueError("rounds and min-devices must be at least 1")
        if not 0.0 < self.quorum <= 1.0:
            raise ValueError("quorum is a share of the round's devices in (0, 1]")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire-dtype must be one of {WIRE_DTYPES}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}")
        if self.local_epochs < 1:
            raise ValueError("local-epochs must be at least 1")

    @staticmethod
    def from_run_config(cfg: Mapping[str, Any]) -> FleetSettings:
        """Settings from Flower's run config (``flwr run ... --run-config 'rounds=3 ...'``)."""
        known = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(FleetSettings) if f.name != "lambdas"}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"unknown fleet settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "workdir" not in cfg or not str(cfg["workdir"]):
            raise ValueError("the run config needs workdir='<the coordinator's store>'")
        kwargs: dict[str, Any] = {known[k]: v for k, v in cfg.items()}
        kwargs["workdir"] = Path(str(kwargs["workdir"]))
        for name, kind in (
            ("rounds", int),
            ("min_devices", int),
            ("local_epochs", int),
            ("quorum", float),
            ("wait_s", float),
            ("timeout_s", float),
        ):
            if name in kwargs:
                kwargs[name] = kind(kwargs[name])
        return FleetSettings(**kwargs)
