"""What continual fusion keeps between tasks, as flat tensors for the checkpoint's plugin state.

:class:`FusionState` holds the shared base (the trainable parameters before the first task), the
unified delta with every task's packed mask and rescale (:mod:`cvm_edge.lab.fusion`), the normalisation
statistics (BatchNorm running mean/var) of each task where they differ from the base, and one
routing prototype per task. Task ``t``'s model is ``base + rescale_t * mask_t * unified`` with its
own statistics; the unified model is ``base + unified`` with the mean of the tasks' statistics.

Why statistics are kept per task instead of being fused: running variances must stay positive
and a rescaled masked delta does not guarantee it; they are small (a few kB for a slim ResNet).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from cvm_edge.lab.fusion import FusionBytes, Mask, PackedMask, Params, Unified, apply_delta, masks_nbytes, params_nbytes

M = TypeVar("M", bound=nn.Module)


def trainable_params(model: nn.Module) -> Params:
    """The parameters that training moves (the ones fusion works on), detached, on the CPU."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def float_stats(model: nn.Module) -> Params:
    """Persistent floating-point buffers (BatchNorm running statistics), detached, on the CPU."""
    params = {n for n, _ in model.named_parameters()}
    return {
        k: v.detach().float().cpu().clone()
        for k, v in model.state_dict().items()
        if k not in params and v.is_floating_point()
    }


def load_into(model: nn.Module, params: Mapping[str, torch.Tensor], stats: Mapping[str, torch.Tensor]) -> None:
    """Copy ``params`` and ``stats`` into the same-named tensors of ``model`` (in place, any device)."""
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [k for k in params if k not in named] + [k for k in stats if k not in buffers]
    if missing:
        raise ValueError(f"the model has no tensors named {missing[:3]}")
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v)
        for k, v in stats.items():
            buffers[k].copy_(v)


def model_with(template: M, params: Mapping[str, torch.Tensor], stats: Mapping[str, torch.Tensor]) -> M:
    """A copy of ``template`` holding ``params`` and ``stats``, in eval mode."""
    model = copy.deepcopy(template)
    load_into(model, params, stats)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class FusionState:
    base: Params
    base_stats: Params
    unified: Unified | None = None
    task_stats: tuple[Params, ...] = ()  # only the statistics that differ from base_stats
    prototypes: torch.Tensor | None = None  # [T, F] float32
    task_classes: tuple[tuple[int, ...], ...] = ()

    @property
    def n_tasks(self) -> int:
        return 0 if self.unified is None else self.unified.n_tasks

    # ----- models -----------------------------------------------------------------------------------
    def unified_params(self) -> Params:
        if self.unified is None:
            return {k: v.clone() for k, v in self.base.items()}
        return apply_delta(self.base, self.unified.delta)

    def task_params(self, t: int) -> Params:
        if self.unified is None:
            raise ValueError("no task has been fused yet")
        return apply_delta(self.base, self.unified.task_delta(t))

    def full_stats(self, t: int) -> Params:
        """Task ``t``'s statistics (the base's where the task did not change them)."""
        return {**self.base_stats, **self.task_stats[t]}

    def unified_stats(self) -> Params:
        """The mean of the tasks' statistics (the base's before any task)."""
        if not self.task_stats:
            return dict(self.base_stats)
        return {k: torch.stack([self.full_stats(t)[k] for t in range(self.n_tasks)]).mean(0) for k in self.base_stats}

    # ----- bytes ------------------------------------------------------------------------------------
    def nbytes(self) -> FusionBytes:
        return FusionBytes(
            base=params_nbytes(self.base),
            unified=0 if self.unified is None else params_nbytes(self.unified.delta),
            masks=0 if self.unified is None else masks_nbytes(self.unified.masks),
            rescales=4 * self.n_tasks,
            task_stats=sum(params_nbytes(s) for s in self.task_stats),
            prototypes=0 if self.prototypes is None else int(self.prototypes.numel() * 4),
        )

    # ----- flat tensors (checkpoint plugin state) ------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {f"base.{k}": v for k, v in self.base.items()}
        out.update({f"base_stats.{k}": v for k, v in self.base_stats.items()})
        if self.unified is None:
            return out
        out.update({f"unified.{k}": v for k, v in self.unified.delta.items()})
        for t, mask in enumerate(self.unified.masks):
            out.update({f"mask.{t}.{k}": torch.from_numpy(m.bits.copy()) for k, m in mask.items()})
            out.update({f"stats.{t}.{k}": v for k, v in self.task_stats[t].items()})
            out[f"classes.{t}"] = torch.tensor(self.task_classes[t], dtype=torch.int64)
        out["rescales"] = torch.tensor(self.unified.rescales, dtype=torch.float32)
        if self.prototypes is not None:
            out["prototypes"] = self.prototypes
        return out

    @classmethod
    def from_tensors(cls, d: Mapping[str, torch.Tensor]) -> FusionState:
        def group(prefix: str) -> Params:
            return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}

        base, base_stats = group("base."), group("base_stats.")
        if not base:
            raise ValueError("the fusion state holds no base parameters")
        if "rescales" not in d:
            return cls(base, base_stats)
        rescales = tuple(float(v) for v in d["rescales"])
        masks: list[Mask] = []
        stats: list[Params] = []
        classes: list[tuple[int, ...]] = []
        for t in range(len(rescales)):
            bits = group(f"mask.{t}.")
            masks.append({k: PackedMask(bits[k].numpy().astype(np.uint8), tuple(base[k].shape)) for k in base})
            stats.append(group(f"stats.{t}."))
            classes.append(tuple(int(c) for c in d[f"classes.{t}"]))
        unified = Unified(group("unified."), tuple(masks), rescales)
        return cls(base, base_stats, unified, tuple(stats), d.get("prototypes"), tuple(classes))
