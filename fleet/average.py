"""The coordinator's arithmetic of a gradient round (no Flower, no stores): check each device's head
weights, then merge the accepted ones into the fleet's next weights.

- ``fedavg``: the mean of the devices' weights, each weighted by its number of training images
  (McMahan et al.'s FedAvg); accumulated in float64, published in float32. The fleet then steps by
  server momentum (FedAvgM, Hsu et al. 2019; server learning rate 1, ``SERVER_MOMENTUM``): the
  round's move, the mean's step from the round's start plus ``SERVER_MOMENTUM`` times the previous
  round's move, is kept on the coordinator with the weights (``MOMENTUM_KEY``). Under label skew the
  devices' averaged steps are small and noisy; momentum carries the direction they agree on across
  rounds (issue 21: 10 devices of 3 of imagenette's 10 classes end 6.3 points below centralised
  after 10 rounds with the plain mean, 3.1 with momentum; 100 devices 2.6 and 0.9).
- ``fusion``: ConDU's data-free fusion (``cvm_edge.lab.fusion.unify``) of each device's delta from the
  weights the round started from: sign consensus, the largest agreeing magnitude. Every device
  publishes the same unified weights. Each device's mask and rescale (where its delta agrees with the
  consensus) are kept too, with its routing prototype (the mean frozen-backbone feature of its
  images), as the coordinator store's fusion state (``fleet.fused``): ``cvm export --experimental --fusion-routing top-k``
  then serves the devices' rebuilt models routed to the closest ``k``.

Only the concept head travels (the mapper and the logit scale): the backbone is the fleet's frozen
base, the same on every device, so it is never sent."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fleet.merge import checked
from fleet.wire import ContributionError

GRADIENT_MERGES = ("fedavg", "fusion")
SERVER_MOMENTUM = 0.9  # fedavg's server momentum (FedAvgM's beta; 0: the plain mean)
MOMENTUM_KEY = "fleet_momentum"  # the coordinator checkpoint's plugin state holding the last fedavg move
MERGES = ("analytic", *GRADIENT_MERGES)
HEAD_PREFIX = "head."  # the weights a gradient fleet trains and merges (the backbone is frozen)
WEIGHTS_DTYPE = np.dtype(np.float32)

Weights = dict[str, np.ndarray]


def merge_mismatch(merge: str, learner: str) -> str | None:
    """Why ``merge`` cannot run on a coordinator store of ``learner``; None when it can."""
    if merge == "analytic" and learner != "analytic":
        return (
            "--merge analytic needs an analytic coordinator store; this one is gradient: use --merge fedavg or fusion"
        )
    if merge != "analytic" and learner != "gradient":
        return (
            f"--merge {merge} averages gradient-trained weights; this coordinator store is analytic "
            "(create one with `cvm fleet init --learner gradient`, or use --merge analytic)"
        )
    return None


def head_weights(state: Mapping[str, Any]) -> Weights:
    """The concept head's weights of a model's state (float32 numpy arrays, by name)."""
    return {
        k: np.array(v.detach().cpu().numpy(), np.float32, order="C")  # ascontiguousarray would make 0-d 1-d
        for k, v in sorted(state.items())
        if k.startswith(HEAD_PREFIX)
    }


@dataclasses.dataclass(frozen=True)
class WeightsUpload:
    """One device's head weights after its local ``cvm update``, as the coordinator received them."""

    device: str
    base: str  # fingerprint of the device store's base (fleet.base.base_fingerprint)
    table: str  # the concept table it trained on
    weights: Mapping[str, np.ndarray]
    images: int  # training images behind the weights: FedAvg's weight
    seen: tuple[int, ...]  # table rows the device's model knows
    wire_bytes: int = 0
    # fusion: the mean frozen-backbone feature of the device's images (float32 [F]), its routing prototype
    prototype: np.ndarray | None = None
    local: tuple[int, ...] = ()  # table rows of the device's own images (its routed model's classes)


@dataclasses.dataclass(frozen=True)
class ExpectedWeights:
    """What every upload of a round must match: the fleet's base and table, and the head's shapes."""

    base: str
    table: str
    rows: int
    shapes: Mapping[str, tuple[int, ...]]
    feature_width: int | None = None  # a prototype's length (the frozen backbone's features), where known


def check_upload(u: WeightsUpload, expected: ExpectedWeights) -> None:
    """Raise ContributionError naming what does not match (the device is left out of the round)."""
    if u.base != expected.base:
        raise ContributionError(f"base {u.base[:12]} is not the fleet's {expected.base[:12]}")
    if u.table != expected.table:
        raise ContributionError(f"concept table {u.table[:12]} is not the fleet's {expected.table[:12]}")
    if set(u.weights) != set(expected.shapes):
        extra, missing = sorted(set(u.weights) - set(expected.shapes)), sorted(set(expected.shapes) - set(u.weights))
        raise ContributionError(f"weights with unexpected names {extra[:3]} or without {missing[:3]}")
    for name, shape in expected.shapes.items():
        a = u.weights[name]
        if a.dtype != WEIGHTS_DTYPE:
            raise ContributionError(f"{name} of dtype {a.dtype}, the fleet's weights are float32")
        if tuple(a.shape) != tuple(shape):
            raise ContributionError(f"{name} of shape {tuple(a.shape)}, the fleet's is {tuple(shape)}")
        if not np.isfinite(a).all():
            raise ContributionError(f"{name} has non-finite values")
    # bool is an int in Python: a `True` image count is a malformed answer, not one image
    if isinstance(u.images, bool) or not isinstance(u.images, int) or u.images < 1:
        raise ContributionError(f"{u.images!r} training images: FedAvg weighs each device by a positive count")
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < expected.rows for c in u.seen):
        raise ContributionError(f"seen classes outside the fleet's table of {expected.rows} rows")
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < expected.rows for c in u.local):
        raise ContributionError(f"local classes outside the fleet's table of {expected.rows} rows")
    if u.prototype is not None:
        p = u.prototype
        width = expected.feature_width
        if p.dtype != WEIGHTS_DTYPE or p.ndim != 1 or (width is not None and p.shape[0] != width):
            raise ContributionError(
                f"a routing prototype is float32 of shape ({width},), got {p.dtype} of shape {tuple(p.shape)}"
            )
        if not np.isfinite(p).all():
            raise ContributionError("the routing prototype has non-finite values")


def fedavg(weights: Sequence[Mapping[str, np.ndarray]], images: Sequence[int]) -> Weights:
    """``sum_i n_i w_i / sum_i n_i`` for every name, in float64, returned as float32."""
    if not weights or len(weights) != len(images):
        raise ValueError("fedavg needs one image count per set of weights, and at least one")
    total = float(sum(images))
    if total <= 0:
        raise ValueError("fedavg needs a positive number of images")
    out: Weights = {}
    for k in weights[0]:
        acc = np.zeros(np.shape(weights[0][k]), np.float64)
        for w, n in zip(weights, images, strict=True):
            acc += np.asarray(w[k], np.float64) * n
        out[k] = np.asarray(acc / total, np.float32)  # 0-d stays an array (the logit scale), not a scalar
    return out


def fedavgm(
    current: Mapping[str, np.ndarray],
    weights: Sequence[Mapping[str, np.ndarray]],
    images: Sequence[int],
    momentum: Mapping[str, np.ndarray] | None,
    beta: float = SERVER_MOMENTUM,
) -> tuple[Weights, Weights | None]:
    """FedAvgM with server learning rate 1: the round's move ``m = beta * momentum + (current - mean)``
    (``mean`` the :func:`fedavg` of ``weights``) and the new weights ``current - m``; returns both (the
    move is the next round's ``momentum``). ``momentum`` None, or one whose names or shapes are not
    ``current``'s, is no earlier move (the first round is the plain mean). ``beta`` 0: plain
    :func:`fedavg`, and no move kept."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"server momentum must be in [0, 1), not {beta}")
    mean = fedavg(weights, images)
    if beta == 0.0:
        return mean, None
    last = momentum if momentum is not None and set(momentum) == set(current) else None
    if last is not None and any(np.shape(last[k]) != np.shape(current[k]) for k in current):
        last = None
    moved: Weights = {}
    out: Weights = {}
    for k in current:
        c = np.asarray(current[k], np.float64)
        m = c - np.asarray(mean[k], np.float64)
        if last is not None:
            m += beta * np.asarray(last[k], np.float64)
        moved[k] = np.asarray(m, np.float32)
        out[k] = np.asarray(c - m, np.float32)
    return out, moved


def fuse(current: Mapping[str, np.ndarray], weights: Sequence[Mapping[str, np.ndarray]]) -> Weights:
    """``current`` plus the ConDU unification of every device's delta from it."""
    return fuse_devices(current, weights)[0]


def fuse_devices(current: Mapping[str, np.ndarray], weights: Sequence[Mapping[str, np.ndarray]]) -> tuple[Weights, Any]:
    """:func:`fuse`, and the ``cvm_edge.lab.fusion.Unified`` it came from: the unified delta with each
    device's mask and rescale, in the order of ``weights``."""
    import torch  # only here: `cvm fleet` imports this module for its choices, torch loads in the commands

    from cvm_edge.lab.fusion import unify

    # np.asarray around each difference and sum: on 0-d arrays (the logit scale) numpy returns scalars
    base = {k: np.asarray(v, np.float32) for k, v in current.items()}
    deltas = [{k: torch.from_numpy(np.asarray(np.asarray(w[k], np.float32) - base[k])) for k in base} for w in weights]
    unified = unify(deltas)
    return {k: np.asarray(base[k] + unified.delta[k].numpy(), np.float32) for k in base}, unified


@dataclasses.dataclass(frozen=True)
class WeightsMerge:
    weights: Weights  # the fleet's weights after this round
    accepted: tuple[str, ...]
    refused: Mapping[str, str]  # device -> why it was left out
    images: Mapping[str, int]  # accepted device -> its training images
    seen: tuple[int, ...]  # rows the merged model knows: every accepted device's, and earlier rounds'
    # fusion: the round's start weights and the cvm_edge.lab.fusion.Unified of the accepted devices' deltas
    # (their masks and rescales, in ``accepted`` order), for the store's fusion state (fleet.fused)
    start: Mapping[str, np.ndarray] | None = None
    unified: Any = None
    uploads: tuple[WeightsUpload, ...] = ()
    # fedavg: this round's move (FedAvgM's momentum, ``fedavgm``), kept with the weights for the next round
    momentum: Weights | None = None


def merge_weights(
    how: str,
    current: Mapping[str, np.ndarray],
    seen: Sequence[int],
    uploads: Sequence[WeightsUpload],
    expected: ExpectedWeights,
    asked: Sequence[str],
    quorum: float,
    failed: Mapping[str, str] | None = None,
    *,
    momentum: Mapping[str, np.ndarray] | None = None,
    server_momentum: float = SERVER_MOMENTUM,
) -> WeightsMerge:
    """``how`` (fedavg | fusion) over every upload that matches ``expected``; ``current`` the weights
    the round started from and ``seen`` the rows they know; ``momentum`` the move of the fedavg round
    that published ``current`` (None: none), stepped with ``server_momentum`` (:func:`fedavgm`).
    Raises QuorumError when fewer than ``quorum`` (a share of ``asked``) contributed: nothing is
    published then."""
    if how not in GRADIENT_MERGES:
        raise ValueError(f"a gradient merge is one of {GRADIENT_MERGES}, not {how!r}")
    accepted, refused = checked(uploads, lambda u: check_upload(u, expected), asked, quorum, failed)
    ws = [u.weights for u in accepted]
    unified, moved = None, None
    if how == "fedavg":
        merged, moved = fedavgm(current, ws, [u.images for u in accepted], momentum, server_momentum)
    else:
        merged, unified = fuse_devices(current, ws)
    rows = sorted({int(c) for c in seen} | {c for u in accepted for c in u.seen})
    return WeightsMerge(
        merged,
        tuple(u.device for u in accepted),
        refused,
        {u.device: u.images for u in accepted},
        tuple(rows),
        start=dict(current) if unified is not None else None,
        unified=unified,
        uploads=tuple(accepted),
        momentum=moved,
    )


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """sha256 of the weights (names, shapes, float32 bytes): a device checks it publishes what the
    coordinator published."""
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.ascontiguousarray(np.asarray(weights[name], np.float32))
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
