"""Data-free model fusion (after ConDU, 2025): unify task deltas by sign consensus, rebuild any task.

Every task's model is kept as its parameter delta from one shared base, ``delta_t = theta_t - base``.
:func:`unify` merges them without data:

* ``sign = sign(sum_t delta_t)`` elementwise (the sign consensus);
* ``mask_t = (sign(delta_t) == sign) & (sign != 0)``: where task ``t`` agrees with the consensus;
* ``unified = sign * max_t(|delta_t| * mask_t)``: the largest agreeing magnitude;
* ``rescale_t = sum|delta_t| / sum|mask_t * unified|`` (sums over every parameter of the model: one
  scalar per task, as in ConDU and TALL masks): the rebuilt delta keeps the L1 mass of the true one.
  A task that agrees nowhere (the denominator is 0) gets ``rescale_t = 0``: its rebuilt delta is 0.

:func:`rebuild` is then ``base + rescale_t * mask_t * unified``. It is exact (bit for bit) for a task
whose delta agrees with the consensus everywhere and holds the largest magnitude everywhere (then
``mask_t * unified == delta_t`` and ``rescale_t == 1``); for any other task it is the ConDU
approximation, and :func:`relative_error` measures how far off it is.

Masks are stored as packed bits (``np.packbits``, one byte per 8 parameters), so the byte counts of
:class:`FusionBytes` are what a device really stores. Pure functions on state dicts (name -> tensor)
of the trainable parameters; no training, no data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Params = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A boolean tensor as ``np.packbits`` of its flattened values, plus its shape."""

    bits: np.ndarray  # uint8, ceil(numel / 8) bytes
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        if mask.dtype != torch.bool:
            raise ValueError(f"a mask is a bool tensor, got {mask.dtype}")
        return cls(np.packbits(mask.detach().cpu().numpy().reshape(-1)), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        n = int(np.prod(self.shape, dtype=np.int64))
        flat = np.unpackbits(self.bits, count=n).astype(bool)
        return torch.from_numpy(flat.reshape(self.shape))

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


Mask = dict[str, PackedMask]


@dataclasses.dataclass(frozen=True)
class Unified:
    """The result of :func:`unify`: one delta for all tasks, and each task's mask and rescale."""

    delta: Params
    masks: tuple[Mask, ...]
    rescales: tuple[float, ...]  # float32 values (what is stored and what rebuild multiplies by)

    @property
    def n_tasks(self) -> int:
        return len(self.masks)

    def task_delta(self, t: int) -> Params:
        return rebuild_delta(self.delta, self.masks[t], self.rescales[t])


def task_delta(params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Params:
    """``params - base`` for every name of ``base`` (float32, on the CPU)."""
    _check_names(params, base)
    return {k: params[k].detach().float().cpu() - base[k].detach().float().cpu() for k in base}


def unify(deltas: Sequence[Mapping[str, torch.Tensor]]) -> Unified:
    """Sign consensus, agreement masks, largest agreeing magnitude and rescales (module docstring)."""
    if not deltas:
        raise ValueError("unify needs at least one task delta")
    names = list(deltas[0])
    for d in deltas[1:]:
        _check_names(d, deltas[0])
    unified: Params = {}
    masks: list[Mask] = [{} for _ in deltas]
    bool_masks: list[dict[str, torch.Tensor]] = [{} for _ in deltas]
    for name in names:
        stack = torch.stack([d[name].detach().float().cpu() for d in deltas])  # [T, ...]
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (sign != 0)
        magnitude = (stack.abs() * agree).amax(0)
        unified[name] = sign * magnitude
        for t in range(len(deltas)):
            bool_masks[t][name] = agree[t]
            masks[t][name] = PackedMask.pack(agree[t])
    rescales = []
    for t, d in enumerate(deltas):
        # float64 sums: the ratio of two equal float32 sums is then exactly 1.
        num = sum(float(d[n].detach().double().abs().sum()) for n in names)
        den = sum(float((unified[n].double() * bool_masks[t][n]).abs().sum()) for n in names)
        rescales.append(float(np.float32(num / den)) if den > 0 else 0.0)
    return Unified(unified, tuple(masks), tuple(rescales))


def rebuild_delta(unified: Mapping[str, torch.Tensor], mask: Mask, rescale: float) -> Params:
    """``rescale * mask * unified`` (float32)."""
    _check_names(mask, unified)
    r = torch.tensor(rescale, dtype=torch.float32)
    return {k: r * (mask[k].unpack() * unified[k]) for k in unified}


def rebuild(
    base: Mapping[str, torch.Tensor], unified: Mapping[str, torch.Tensor], mask: Mask, rescale: float
) -> Params:
    """A task's parameters: ``base + rescale * mask * unified``."""
    _check_names(unified, base)
    delta = rebuild_delta(unified, mask, rescale)
    return {k: base[k].detach().float().cpu() + delta[k] for k in base}


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Params:
    """``base + delta`` (the unified model is ``apply_delta(base, unified.delta)``)."""
    _check_names(delta, base)
    return {k: base[k].detach().float().cpu() + delta[k] for k in base}


def relative_error(approx: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]) -> float:
    """``||approx - exact||_2 / ||exact||_2`` over all tensors (0 when both are 0)."""
    _check_names(approx, exact)
    num = sum(float((approx[k].double() - exact[k].double()).pow(2).sum()) for k in exact)
    den = sum(float(exact[k].double().pow(2).sum()) for k in exact)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


@dataclasses.dataclass(frozen=True)
class FusionBytes:
    """What fusion stores, in bytes (counted against the replay buffer at equal memory)."""

    base: int  # the shared base of the trained parameters (float32)
    unified: int  # the unified delta (float32)
    masks: int  # every task's packed mask
    rescales: int  # one float32 per task
    task_stats: int  # per-task normalisation statistics that differ from the base (float32)
    prototypes: int  # routing prototypes (float32)

    @property
    def total(self) -> int:
        return self.base + self.unified + self.masks + self.rescales + self.task_stats + self.prototypes

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def params_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    return sum(int(v.numel() * v.element_size()) for v in params.values())


def masks_nbytes(masks: Sequence[Mask]) -> int:
    return sum(m.nbytes for mask in masks for m in mask.values())


def _check_names(a: Mapping[str, object], b: Mapping[str, object]) -> None:
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"state dicts do not hold the same tensors (differ in {diff[:3]})")
