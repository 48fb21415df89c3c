"""cvm_edge.lab.fusion: sign consensus, masks, rescales, exact rebuilds, packed-bit byte counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cvm_edge.lab.fusion import (
    FusionBytes,
    PackedMask,
    apply_delta,
    masks_nbytes,
    rebuild,
    rebuild_delta,
    relative_error,
    task_delta,
    unify,
)


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_sign_consensus_masks_and_largest_agreeing_magnitude() -> None:
    a = {"w": t(1.0, -3.0, 0.5, 0.0), "b": t(2.0)}
    b = {"w": t(2.0, 1.0, -0.25, 0.0), "b": t(-1.0)}
    c = {"w": t(-1.0, 1.0, 0.5, 0.0), "b": t(-4.0)}
    u = unify([a, b, c])
    # sums: w = (2, -1, 0.75, 0), b = -3 -> signs (+, -, +, 0), -
    assert u.delta["w"].tolist() == [2.0, -3.0, 0.5, 0.0]  # element 0: b's 2 beats a's 1; c disagrees
    assert u.delta["b"].tolist() == [-4.0]
    masks = [{k: m.unpack().tolist() for k, m in mask.items()} for mask in u.masks]
    assert masks[0] == {"w": [True, True, True, False], "b": [False]}
    assert masks[1] == {"w": [True, False, False, False], "b": [True]}
    assert masks[2] == {"w": [False, False, True, False], "b": [True]}  # a zero sum agrees with nobody
    # rescale_t = sum|delta_t| / sum|mask_t * unified|
    assert u.rescales[0] == pytest.approx((1 + 3 + 0.5 + 0 + 2) / (2 + 3 + 0.5))
    assert u.rescales[1] == pytest.approx((2 + 1 + 0.25 + 1) / (2 + 4))
    assert u.rescales[2] == pytest.approx((1 + 1 + 0.5 + 4) / (0.5 + 4))


def test_task_that_agrees_nowhere_gets_rescale_zero() -> None:
    u = unify([{"w": t(5.0, 5.0)}, {"w": t(-1.0, -1.0)}])
    assert u.masks[1]["w"].unpack().tolist() == [False, False] and u.rescales[1] == 0.0
    assert u.task_delta(1)["w"].tolist() == [0.0, 0.0]


def test_a_fully_agreeing_task_with_the_largest_magnitudes_is_rebuilt_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    shape = (7, 5, 3)
    big = torch.randn(shape, generator=g)
    small = big.sign() * big.abs() * torch.rand(shape, generator=g)  # same signs, smaller magnitudes
    # a third task with random signs, below a tenth of the big one's magnitude everywhere
    mixed = torch.randn(shape, generator=g).sign() * 0.1 * torch.rand(shape, generator=g) * big.abs()
    deltas = [{"w": small, "b": small[0]}, {"w": big, "b": big[0]}, {"w": mixed, "b": mixed[0]}]
    u = unify(deltas)
    assert u.rescales[1] == 1.0
    rebuilt = u.task_delta(1)
    assert torch.equal(rebuilt["w"], big) and torch.equal(rebuilt["b"], big[0])  # bit for bit
    assert relative_error(rebuilt, deltas[1]) == 0.0
    # the other tasks are approximations, and the error says by how much
    assert relative_error(u.task_delta(2), deltas[2]) > 0.01


def test_rebuild_formula_holds_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 9, generator=g), "s": torch.randn((), generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    u = unify(deltas)
    for i in range(3):
        got = rebuild(base, u.delta, u.masks[i], u.rescales[i])
        r = torch.tensor(u.rescales[i], dtype=torch.float32)
        for k in base:
            expected = base[k] + r * (u.masks[i][k].unpack() * u.delta[k])
            assert torch.equal(got[k], expected), k
        assert got["w"].dtype == torch.float32
    # a task's delta and apply_delta are each other's inverse on exactly representable values
    params = {"w": t(1.5, -2.0), "s": t(0.25)}
    start = {"w": t(1.0, 1.0), "s": t(0.0)}
    assert all(torch.equal(apply_delta(start, task_delta(params, start))[k], params[k]) for k in params)


def test_masks_are_packed_bits_and_bytes_are_counted_honestly() -> None:
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 2] = mask[2, 6] = True
    packed = PackedMask.pack(mask)
    assert packed.bits.dtype == np.uint8 and packed.nbytes == 3  # 21 bits -> 3 bytes
    assert torch.equal(packed.unpack(), mask)
    deltas = [{"w": torch.randn(100, 10), "b": torch.randn(10)} for _ in range(4)]
    u = unify(deltas)
    assert masks_nbytes(u.masks) == 4 * (1000 // 8 + 10 // 8 + 1)  # per tensor rounded up to a byte
    b = FusionBytes(base=4440, unified=4440, masks=masks_nbytes(u.masks), rescales=16, task_stats=0, prototypes=8)
    assert b.total == 4440 * 2 + 4 * 127 + 16 + 8 and b.to_dict()["total"] == b.total
    with pytest.raises(ValueError, match="bool"):
        PackedMask.pack(torch.zeros(3))


def test_mismatched_state_dicts_are_refused() -> None:
    with pytest.raises(ValueError, match="same tensors"):
        unify([{"w": t(1.0)}, {"v": t(1.0)}])
    with pytest.raises(ValueError, match="at least one"):
        unify([])
    u = unify([{"w": t(1.0)}])
    with pytest.raises(ValueError, match="same tensors"):
        rebuild_delta({"v": t(1.0)}, u.masks[0], 1.0)
