"""Continual data-free fusion (after ConDU, 2025) as a plugin of the one training loop.

* Before the first experience the plugin records the base: the trainable parameters and the
  normalisation statistics of the model as it is then (the initialisation, or the pretrained
  backbone with a fresh mapper).
* Each experience trains from the current unified model (ConDU's choice: the new task starts from
  what all earlier tasks agree on, so its delta from the base tends to share their signs;
  ``start="base"`` trains every task from the base instead). It trains with the configured loss
  even without a buffer (ACE: the task's images compete only among its own classes), since each
  task model only ever has to tell its own classes apart; routing picks the task.
* After training, ConDU's decouple-unify: the earlier tasks' deltas are rebuilt from the unified
  delta, their masks and rescales (only those are stored, not every task's full delta: memory
  stays one delta plus one bit per parameter and task), the new task's delta is taken exactly,
  all are unified again (:func:`cvm_edge.lab.fusion.unify`), and the model is set to the unified
  model ``base + unified`` with the mean of the tasks' statistics. So after every experience the
  trained model *is* the single unified model; :class:`cvm_edge.lab.routing.FusedRoutedModel` builds
  the routed one from :attr:`FusionPlugin.state`.
* The task's routing prototype (its mean base feature) is taken while its images are at hand.

Data-free means no replay: combining this plugin with replay or DER is refused by
``make_plugins`` (the buffer's head tuning would move the model away from the unified one).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from cvm_edge.errors import UsageError
from cvm_edge.lab.fusion import Unified, relative_error, task_delta, unify
from cvm_edge.lab.fusion_state import FusionState, float_stats, load_into, model_with, trainable_params
from cvm_edge.lab.routing import mean_feature
from cvm_edge.strategy import Context, Plugin

log = logging.getLogger(__name__)

# Where each task's training starts: "unified" (ConDU) or "base" (independent task vectors, as in
# task arithmetic / TIES: deltas do not carry earlier tasks' training, so the task models differ more).
STARTS = ("unified", "base")


class FusionPlugin(Plugin):
    name = "fusion"

    def __init__(self, start: str = "unified") -> None:
        if start not in STARTS:
            raise ValueError(f"fusion start must be one of {STARTS}")
        self.start = start
        self.state: FusionState | None = None
        self.reports: list[dict[str, Any]] = []  # one per experience of this process (not persisted)

    def loss_kind(self, configured: str) -> str | None:
        return configured  # ACE: a task does not push down the rows of classes it never sees

    def before_experience(self, ctx: Context) -> None:
        if ctx.model.experts is not None:
            # Fusion unifies the same trainable weights across updates; experts add new ones each update.
            raise UsageError("fusion and per-task experts do not combine: use one or the other")
        if len(ctx.buffer) and ctx.config.balance_epochs:
            # A store that used replay before still holds images: the Strategy would tune the head on
            # them after this plugin set the unified model, and the published model would not be it.
            raise UsageError(
                f"fusion is data-free, but the replay buffer holds {len(ctx.buffer)} images and head balancing "
                "would train on them after fusing; pass --balance-epochs 0"
            )
        if self.state is None:
            self.state = FusionState(trainable_params(ctx.model), float_stats(ctx.model))
            log.info("fusion base recorded: %d trainable tensors", len(self.state.base))
        elif _shapes(self.state.base) != _shapes(trainable_params(ctx.model)):
            # e.g. a linear head that grew with the table, or another --train-backbone choice
            raise ValueError("the model's trainable parameters changed since the fusion base was recorded")
        elif self.start == "base":
            load_into(ctx.model, self.state.base, self.state.base_stats)

    def after_experience(self, ctx: Context) -> None:
        state = self.state
        if state is None:
            raise RuntimeError("after_experience without before_experience")
        model = ctx.model
        new = task_delta(trainable_params(model), state.base)
        earlier = [state.unified.task_delta(t) for t in range(state.n_tasks)] if state.unified else []
        unified = unify([*earlier, new])
        t = unified.n_tasks - 1
        stats = {k: v for k, v in float_stats(model).items() if not torch.equal(v, state.base_stats[k])}
        router = model_with(model, state.base, state.base_stats)
        proto = mean_feature(router, ctx.new_data, ctx.prep, ctx.device)[None]
        del router
        self.state = dataclasses.replace(
            state,
            unified=unified,
            task_stats=(*state.task_stats, stats),
            prototypes=proto if state.prototypes is None else torch.cat([state.prototypes, proto]),
            task_classes=(*state.task_classes, tuple(int(c) for c in ctx.current_classes.tolist())),
        )
        load_into(model, self.state.unified_params(), self.state.unified_stats())
        agreement = _agreement(unified, t)
        report: dict[str, Any] = {
            "task": t,
            "rescales": [round(r, 6) for r in unified.rescales],
            # how far the rebuilt delta of the task just trained is from its true delta (0: exact)
            "rebuild_error_new_task": round(relative_error(unified.task_delta(t), new), 6),
            "agreement_new_task": round(agreement, 6),
            "bytes": self.state.nbytes().to_dict(),
        }
        self.reports.append(report)
        log.info(
            "fused task %d: rescales %s, new task rebuilt with relative error %.4f, %.1f%% of its weights agree",
            t,
            report["rescales"],
            report["rebuild_error_new_task"],
            100 * agreement,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.state is None else self.state.to_tensors()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = FusionState.from_tensors(state) if state else None


def _shapes(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in params.items()}


def _agreement(unified: Unified, t: int) -> float:
    """Share of task ``t``'s parameters whose sign agrees with the consensus."""
    masks = unified.masks[t].values()
    agree = sum(int(m.unpack().sum()) for m in masks)
    total = sum(int(m.unpack().numel()) for m in masks)
    return agree / max(1, total)
