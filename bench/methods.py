"""Continual-learning methods, each a configuration of the product's Strategy and plugins.

Literature hyper-parameters are those reported for Seq-CIFAR-10 by Buzzega et al. (DER, NeurIPS
2020, appendix / mammoth ``best_args``), plain SGD without momentum, batch 32 (+ 32 replayed):

| method | paper setting | here |
|---|---|---|
| fine-tune (SGD) | lr 0.1 | lr 0.1 |
| joint | lr 0.1 | lr 0.1 |
| oEWC | lr 0.03, lambda 10, gamma 1 | lr 0.03, ewc_lambda 20 (our penalty is lambda/2 * sum F dtheta^2), decay 1, Fisher from 128 samples per task, each squared gradient weighted by p(y|x) as mammoth |
| LwF | lr 0.01, alpha 0.5, T 2, wd 5e-4 | lr 0.01, distill weight 0.5 on T^2-scaled KL over old classes, T 2, wd 5e-4 |
| ER | lr 0.1 (buffers 200 and 500) | lr 0.1 |
| DER++ | 200: lr 0.03, alpha 0.1, beta 0.5; 500: lr 0.03, alpha 0.2, beta 0.5 | the same |

``er`` and ``derpp`` follow Mammoth (the DER authors' framework, aimagelab/mammoth at e75a491; issue
20): reservoir buffer filled while the stream passes (``bench.reservoir``), DER++'s logits those of
the training pass at insertion, replay from the second step, cross-entropy over all 10 outputs,
DER++'s two replay draws in two forward passes, CIFAR-10 input statistics with black crop padding
and PyTorch's default initialisation (``bench.mammoth``). ``er-balanced`` and ``derpp-balanced``
are the previous ``er`` / ``derpp``: the product's buffer, rebalanced per class at the end of each
task with DER's logits recorded then (by the model after the task, in eval mode), cross-entropy
over the seen classes, the product's input (mean = std = 0.5) and timm's initialisation.

CVM variants use the product's own defaults (concept head with a 2-layer mapper, Adam lr 1e-3,
asymmetric cross-entropy, 3 epochs of class-balanced head tuning after each task).

``cvm-experts*`` are cvm-er plus per-task experts on the mapper (cvm_edge.lab.experts, after HiDe-LLaVA,
ACL 2025, and MLLM-CL, 2025): rank-8 adapters routed by the cosine of the backbone feature to each
task's anchor, soft (softmax, T 0.1) or hard (top-1); the shared mapper trains with every expert, or
with the first only (``cvm-experts-frozen``). ``cvm-experts-eqmem`` gives up as many replay
images as the experts' bytes would hold (at the end of every task), so it runs at cvm-er's memory.

Fusion methods (issue 7, after ConDU 2025; ``cvm_edge.lab.fusion_plugin``) are data-free: no buffer,
the same training (ACE on each task's classes, Adam lr 1e-3), each task's model kept as a masked,
rescaled share of one unified delta. ``cvm-fusion`` evaluates the single unified model,
``cvm-fusion-routed`` the top-2 task models chosen by base-feature prototypes, each one's softmax
over its own task's classes averaged (``cvm_edge.lab.routing``; ``routed_combine="logits"`` gives the
issue's plain mean of logits). The result JSON records the bytes fusion stores (``stored_bytes``), to set
against the buffer's at equal memory.

``derpp-allce`` (a variant of ``derpp-balanced``, as ``derpp-reservoir``) trains DER++'s cross-entropies over all 10 outputs, as mammoth does (ours: over the
classes seen so far), so the unseen classes' logits are pushed down before they are stored and
matched by the MSE term. ``derpp-reservoir`` and ``cvm-derpp-reservoir`` replace our buffer by the paper's (``bench.reservoir``:
reservoir sampling while the stream passes, logits recorded at insertion, replay from the first step).

Two variants of ``cvm-er-distill`` for the 50-epoch schedule, where it learns each new task poorly
(its accuracy on the task just trained: 27-83 % at seed 0, against 83-98 % for linear ER) and forgets
little: ``cvm-er-distill-ce`` trains the stream's cross-entropy over every seen class instead of ACE
(the new classes are then pushed away from the old ones too), ``cvm-er-distill-sgd`` uses the paper's
ER optimiser (plain SGD, lr 0.1; Adam without weight decay over 50 epochs memorises each task).
Measured (bench/BENCHMARKS.md): the first learns new tasks and forgets like ER, the second sits between.
``cvm-er-distill-align`` keeps ACE and adds the ``align`` plugin: ``1 - cos`` between each incoming
image's embedding and its own fixed row (``cvm_edge.lab.align``), which ACE's softmax over the new
classes alone leaves free, without pushing any old row down.

Two more issue-7 variants of the product default ``cvm-er-distill``: ``cvm-protos`` reads a
multi-prototype concept table (MuproCL, 2025: the class name row plus one row per curated
description shipped in ``llm_embeddings/descriptions``; class score = temperature-scaled LogSumExp
of the prototype cosines), ``cvm-simscale`` multiplies each task's distillation weight by the
task-similarity factor read off the concept table (He et al., 2023; ``cvm_edge.lab.similarity``, power 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cvm_edge.plugins import PluginOptions


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    head: str  # concepts | linear
    plugins: tuple[str, ...]
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "ce"
    balance_epochs: int = 0
    joint: bool = False
    routed_k: int = 0  # fusion methods: evaluate the top-k routed task models instead of the unified one
    routed_combine: str = "probs"  # cvm_edge.lab.routing.COMBINES
    options: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per buffer size: overrides
    base_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields (experts)
    # Count the experts' bytes against the buffer: its capacity shrinks by that many samples' bytes.
    equal_memory: bool = False
    prototypes: bool = False  # a multi-prototype concept table from the bundled class descriptions
    # "gradient": trained by the product's Strategy; "ncm", "analytic", "probe": on frozen backbone
    # features (bench.frozen; analytic is the product's closed-form learner).
    learner: str = "gradient"
    # Mammoth's input and initialisation (bench.mammoth): CIFAR-10 statistics with black crop
    # padding, PyTorch's default layer initialisation; else the product's (0.5 / 0.5, timm's init).
    input_norm: str = "half"
    init: str = "timm"

    @property
    def uses_buffer(self) -> bool:
        return any(p in ("replay", "der", "der-reservoir", "replay-reservoir") for p in self.plugins)

    def resolved(self, buffer: int) -> dict[str, Any]:
        """Hyper-parameters for one buffer size: optimizer fields plus plugin options."""
        hp: dict[str, Any] = {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "loss": self.loss,
            "balance_epochs": self.balance_epochs,
            **self.base_options,
        }
        per = self.options.get(buffer)
        if per is None and self.options:
            per = self.options[min(self.options, key=lambda b: abs(b - buffer))]
        hp.update(per or {})
        return hp

    def plugin_options(self, hp: dict[str, Any]) -> PluginOptions:
        fields = {f.name for f in dataclasses.fields(PluginOptions)}
        return PluginOptions(**{k: v for k, v in hp.items() if k in fields})


# DER++'s loss weights per buffer size (the paper's best); the linear-head runs also take its lr.
DER_WEIGHTS: dict[int, dict[str, Any]] = {
    200: {"der_alpha": 0.1, "der_beta": 0.5},
    500: {"der_alpha": 0.2, "der_beta": 0.5},
}
DERPP_BY_BUFFER = {b: {"lr": 0.03, **w} for b, w in DER_WEIGHTS.items()}
EXPERTS_SOFT: dict[str, Any] = {"experts": "adapter", "expert_rank": 8, "routing": "soft", "routing_temperature": 0.1}
CVM: dict[str, Any] = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "loss": "ace", "balance_epochs": 3}
DISTILL_EMBEDDING: dict[str, Any] = {"distill_target": "embedding", "distill_weight": 1.0}
# No buffer, so no class-balanced head tuning (it runs on the buffer).
FUSION: dict[str, Any] = {**CVM, "balance_epochs": 0}

# Mammoth's er / derpp (aimagelab/mammoth at e75a491, read side by side; bench/README.md): reservoir
# buffer during the stream with logits of the training pass, cross-entropy over every output,
# DER++'s two replay draws in two forward passes, CIFAR-10 input statistics with black crop
# padding, PyTorch's default initialisation.
MAMMOTH: dict[str, Any] = {"loss": "ce-all", "input_norm": "cifar10", "init": "torch"}

# The methods others are variants of (dataclasses.replace below names what each variant changes).
# DERPP_BALANCED is DER++ on the product's buffer (class-balanced, rebuilt at the end of each task
# with the post-task model's eval-mode logits, no replay during the first task), cross-entropy over
# the seen classes, the product's input and timm's init: `derpp` up to e615bfe.
DERPP_BALANCED = Method(
    "derpp-balanced",
    "linear",
    ("der",),
    lr=0.03,
    options=DERPP_BY_BUFFER,
    description="DER++ on the product's class-balanced buffer (our derpp before it followed Mammoth)",
)
DERPP = Method(
    "derpp",
    "linear",
    ("der-reservoir",),
    lr=0.03,
    options=DERPP_BY_BUFFER,
    base_options={"der_passes": 2},
    **MAMMOTH,
    description="DER++ as Mammoth: reservoir buffer, logits at insertion, CE over all outputs, two replay passes",
)
CVM_ER_DISTILL = Method(
    "cvm-er-distill",
    "concepts",
    ("replay", "distill"),
    **CVM,
    base_options=DISTILL_EMBEDDING,
    description="concept head, replay + embedding distillation (the product default)",
)
CVM_DERPP = Method(
    "cvm-derpp",
    "concepts",
    ("der",),
    **CVM,
    options=DER_WEIGHTS,
    description="concept head with DER++ logit replay, ACE on the stream",
)

# Frozen-feature methods (bench.frozen): the analytic learner and its training-free baselines.
ANALYTIC: dict[str, Any] = {"analytic_dim": 2048}
FROZEN_METHODS = (
    Method("ncm", "concepts", (), learner="ncm", description="nearest class mean, cosine (no training, no images)"),
    Method(
        "ranpac",
        "concepts",
        (),
        learner="analytic",
        base_options={**ANALYTIC, "targets": "onehot"},
        description="random ReLU projection + ridge onto one-hot targets, closed form (RanPAC)",
    ),
    Method(
        "cvm-analytic",
        "concepts",
        (),
        learner="analytic",
        base_options={**ANALYTIC, "targets": "concepts"},
        description="random ReLU projection + ridge onto the concept rows, closed form (the analytic learner)",
    ),
    Method(
        "cvm-analytic-whitened",
        "concepts",
        (),
        learner="analytic",
        base_options={**ANALYTIC, "targets": "whitened"},
        description="random ReLU projection + ridge onto the whitened concept rows, closed form",
    ),
    Method(
        "joint-probe",
        "linear",
        (),
        learner="probe",
        joint=True,
        description="logistic regression on all tasks' frozen features at once (upper bound)",
    ),
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *FROZEN_METHODS,
        Method("finetune", "linear", (), lr=0.1, description="fine-tuning, no protection (lower bound)"),
        Method("joint", "linear", (), lr=0.1, joint=True, description="all tasks' data at once (upper bound)"),
        Method(
            "er",
            "linear",
            ("replay-reservoir",),
            lr=0.1,
            **MAMMOTH,
            description="experience replay as Mammoth: reservoir buffer from the second step, CE over all outputs",
        ),
        Method(
            "er-balanced",
            "linear",
            ("replay",),
            lr=0.1,
            description="experience replay on the product's class-balanced buffer (our er before it followed Mammoth)",
        ),
        DERPP,
        DERPP_BALANCED,
        Method(
            "lwf",
            "linear",
            ("distill",),
            lr=0.01,
            weight_decay=5e-4,
            base_options={"distill_target": "logits", "distill_weight": 0.5, "distill_temperature": 2.0},
            description="Learning without Forgetting (logit distillation)",
        ),
        Method(
            "ewc",
            "linear",
            ("ewc",),
            lr=0.03,
            base_options={"ewc_lambda": 20.0, "ewc_decay": 1.0, "ewc_samples": 128},
            description="online EWC",
        ),
        Method(
            "cvm-er", "concepts", ("replay",), **CVM, description="concept head, replay, ACE loss, balanced head tuning"
        ),
        CVM_ER_DISTILL,
        dataclasses.replace(
            CVM_ER_DISTILL,
            name="cvm-protos",
            prototypes=True,
            description="cvm-er-distill on a multi-prototype table (name + curated descriptions, LogSumExp)",
        ),
        dataclasses.replace(
            CVM_ER_DISTILL,
            name="cvm-simscale",
            base_options={**DISTILL_EMBEDDING, "similarity_scaling": 1.0},
            description="cvm-er-distill with each task's distillation weight scaled by its concept-table similarity",
        ),
        dataclasses.replace(
            CVM_ER_DISTILL,
            name="cvm-er-distill-ce",
            loss="ce",
            description="cvm-er-distill with cross-entropy over every seen class on the stream (not ACE)",
        ),
        dataclasses.replace(
            CVM_ER_DISTILL,
            name="cvm-er-distill-sgd",
            optimizer="sgd",
            lr=0.1,
            momentum=0.0,
            description="cvm-er-distill with the paper's ER optimiser (plain SGD, lr 0.1) instead of Adam",
        ),
        dataclasses.replace(
            CVM_ER_DISTILL,
            name="cvm-er-distill-align",
            plugins=(*CVM_ER_DISTILL.plugins, "align"),
            base_options={**DISTILL_EMBEDDING, "align_weight": 1.0},
            description="cvm-er-distill plus 1 - cos(embedding, own row) on incoming images (ACE leaves it free)",
        ),
        CVM_DERPP,
        dataclasses.replace(
            DERPP_BALANCED,
            name="derpp-allce",
            loss="ce-all",
            description="DER++ with cross-entropy over all 10 outputs (stream and buffer), as mammoth trains it",
        ),
        dataclasses.replace(
            DERPP_BALANCED,
            name="derpp-reservoir",
            plugins=("der-reservoir",),
            description="DER++ with the paper's buffer: reservoir sampling during the stream, logits at insertion",
        ),
        dataclasses.replace(
            CVM_DERPP,
            name="cvm-derpp-reservoir",
            plugins=("der-reservoir",),
            balance_epochs=0,
            description="cvm-derpp with the paper's reservoir buffer (no class-balanced head tuning: no product buffer)",
        ),
        Method(
            "cvm-experts",
            "concepts",
            ("replay",),
            **CVM,
            model_options=EXPERTS_SOFT,
            description="cvm-er + per-task mapper experts, soft routing by feature anchors",
        ),
        Method(
            "cvm-experts-hard",
            "concepts",
            ("replay",),
            **CVM,
            model_options={**EXPERTS_SOFT, "routing": "hard"},
            description="cvm-er + per-task mapper experts, hard top-1 routing by feature anchors",
        ),
        Method(
            "cvm-experts-frozen",
            "concepts",
            ("replay",),
            **CVM,
            model_options={**EXPERTS_SOFT, "expert_shared_mapper": "first"},
            description="cvm-experts with the shared mapper trained on the first task only (HiDe-LLaVA style)",
        ),
        Method(
            "cvm-experts-eqmem",
            "concepts",
            ("replay",),
            **CVM,
            model_options=EXPERTS_SOFT,
            equal_memory=True,
            description="cvm-experts with the buffer shrunk by the experts' bytes (equal memory)",
        ),
        Method(
            "cvm-fusion",
            "concepts",
            ("fusion",),
            **FUSION,
            description="data-free fusion (ConDU-style sign consensus): the single unified model",
        ),
        Method(
            "cvm-fusion-routed",
            "concepts",
            ("fusion",),
            **FUSION,
            routed_k=2,
            description="data-free fusion: top-2 task models by base-feature prototype, own-class softmaxes averaged",
        ),
    )
}

BUFFERLESS = tuple(n for n, m in METHODS.items() if not m.uses_buffer)
