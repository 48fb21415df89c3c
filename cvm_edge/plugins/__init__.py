"""Anti-forgetting plugins for the shared Strategy, one small module each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cvm_edge import vocabulary
from cvm_edge.lab.align import AlignPlugin
from cvm_edge.lab.fusion_plugin import FusionPlugin
from cvm_edge.plugins.balance import HeadBalancePlugin
from cvm_edge.plugins.der import DerPlugin
from cvm_edge.plugins.distill import DistillPlugin
from cvm_edge.plugins.ewc import EwcPlugin
from cvm_edge.plugins.replay import ReplayMemory, ReplayPlugin
from cvm_edge.strategy import Plugin

PLUGIN_NAMES = vocabulary.PLUGINS


@dataclasses.dataclass(frozen=True)
class PluginOptions:
    distill_weight: float = vocabulary.UPDATE["distill_weight"].default
    distill_target: str = vocabulary.UPDATE["distill_target"].default  # embedding | logits
    distill_temperature: float = 2.0
    ewc_lambda: float = vocabulary.UPDATE["ewc_lambda"].default
    ewc_decay: float = 1.0  # online EWC: old Fisher is multiplied by this before adding the new one
    ewc_samples: int = 512
    der_alpha: float = 0.1  # DER++ (Buzzega et al. 2020): weight of the MSE to stored logits
    der_beta: float = 0.5  # DER++: weight of the cross-entropy on a second buffer batch (0: plain DER)
    # Task-similarity scaling of distill_weight and ewc_lambda (cvm_edge.lab.similarity): the power P of
    # factor = clip((mean old-new cosine / table mean cosine) ** P, 1/4, 4); 0 is off.
    similarity_scaling: float = vocabulary.UPDATE["similarity_scaling"].default
    fusion_start: str = "unified"  # fusion: each task trains from the unified model or from the base
    align_weight: float = vocabulary.UPDATE[
        "align_weight"
    ].default  # align: weight of 1 - cos(embedding, own row) on incoming images


def parse_plugin_list(text: str) -> list[str]:
    """``"replay,distill"`` -> names; ``""`` or ``"none"`` -> []. Unknown names raise ValueError."""
    names = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    bad = [n for n in names if n not in PLUGIN_NAMES]
    if bad:
        raise ValueError(f"unknown plugin(s) {', '.join(bad)}; choose from {', '.join(PLUGIN_NAMES)} or none")
    if len(set(names)) != len(names):
        raise ValueError("a plugin is named twice")
    _check_combination(names)
    return names


def _check_combination(names: Sequence[str]) -> None:
    # Fusion keeps the model equal to the unified one; the buffer's head tuning would move it away.
    if "fusion" in names and {"replay", "der"} & set(names):
        raise ValueError("fusion is data-free: it cannot be combined with replay or der")


def make_plugins(names: Sequence[str], options: PluginOptions = PluginOptions()) -> list[Plugin]:
    """The named plugins, in order. Those that replay share one :class:`ReplayMemory`; head
    balancing on the buffer comes last in every list (it runs when ``TrainConfig.balance_epochs``
    > 0 and there is a buffer)."""
    _check_combination(names)
    plugins: list[Plugin] = []
    memory = ReplayMemory()
    for name in names:
        if name == "replay":
            plugins.append(ReplayPlugin(memory))
        elif name == "distill":
            plugins.append(
                DistillPlugin(
                    options.distill_weight,
                    options.distill_target,
                    options.distill_temperature,
                    options.similarity_scaling,
                )
            )
        elif name == "ewc":
            plugins.append(
                EwcPlugin(options.ewc_lambda, options.ewc_decay, options.ewc_samples, options.similarity_scaling)
            )
        elif name == "der":
            plugins.append(DerPlugin(options.der_alpha, options.der_beta, memory))
        elif name == "fusion":
            plugins.append(FusionPlugin(options.fusion_start))
        elif name == "align":
            plugins.append(AlignPlugin(options.align_weight))
        else:
            raise ValueError(f"unknown plugin {name!r}")
    plugins.append(HeadBalancePlugin(memory))
    return plugins


__all__ = [
    "PLUGIN_NAMES",
    "AlignPlugin",
    "DerPlugin",
    "DistillPlugin",
    "EwcPlugin",
    "FusionPlugin",
    "HeadBalancePlugin",
    "PluginOptions",
    "ReplayMemory",
    "ReplayPlugin",
    "make_plugins",
    "parse_plugin_list",
]
