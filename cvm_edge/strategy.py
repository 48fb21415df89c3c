"""The one training loop, shared by ``cvm update`` and the benchmarks.

A :class:`Strategy` trains a :class:`~cvm_edge.model.CvmModel` on one experience (the new data of
an update) with a list of plugins. Plugins hook in at clearly named points and return values
(an extended batch, an extra loss term) instead of mutating the loop's state.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cvm_edge import vocabulary
from cvm_edge.augment import black_fill, random_crop_flip, to_input
from cvm_edge.backbones import feature_dim
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.data import ImageSet
from cvm_edge.errors import TrainingDivergedError
from cvm_edge.lab.experts import add_task_expert
from cvm_edge.model import CvmModel
from cvm_edge.preprocess import Preprocessing
from cvm_edge.trainer_backend import EAGER, StepFn, TrainerBackend

log = logging.getLogger(__name__)

OPTIMIZERS = vocabulary.OPTIMIZERS
DIVERGED_HINT = "lower the learning rate or the regularisation weights (ewc lambda, distill weight)"
# ce-all: the benchmarks' mammoth-style baselines. local: a fleet device's round (fleet/weights_device.py),
# set by the fleet, not a `cvm update` choice.
LOCAL_LOSS = "local"
LOSSES = (*vocabulary.LOSSES, "ce-all", LOCAL_LOSS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    replay_batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True
    crop_pad: int = 4
    # Pad the random crop with black pixels (as torchvision pads before normalising: Mammoth's
    # baselines) instead of 0 in the normalised input (the mean colour).
    crop_pad_black: bool = False
    seed: int = 0
    device: str = "cpu"
    # Inference batch size; None picks one from the image size (see ``eval_batch_for``).
    eval_batch_size: int | None = None
    progress: bool = True
    # "ace": asymmetric cross-entropy (Caccia et al., ICLR 2022): incoming images of new classes
    # compete only among the classes of this experience, replayed ones among all seen classes, so
    # new classes stop pushing old class rows away. Incoming images of a revisited class (known
    # before, new domain) compete among all seen classes (see ``classification_loss``).
    # "ce": plain cross-entropy over all seen classes. "ce-all": over every table row, unseen
    # (future) classes too, as mammoth's class-incremental baselines train (benchmark use).
    # "local": every image, incoming or replayed, competes only among the classes this store holds
    # images of (``Context.local_classes``): a fleet device's round, whose other classes the rest of
    # the fleet trains (see ``classification_loss``).
    loss: str = "ace"
    # Class-balanced head tuning (as in EEIL, Castro et al. 2018): after an experience, the mapper
    # and scale are tuned for this many epochs on the (class-balanced) replay buffer, which removes
    # the bias towards the classes that were just trained on. 0 turns it off.
    balance_epochs: int = 3
    # NHWC memory format for the model and its image inputs: on CPU (oneDNN) it roughly halves the
    # time of an EfficientNet-Lite0 pass; `cvm update` turns it on, the benchmarks choose.
    channels_last: bool = False
    # Refresh the progress bar's loss every this many steps: reading the loss waits for the device.
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.replay_batch_size < 0:
            raise ValueError("epochs and batch_size must be >= 1, replay_batch_size >= 0")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")

    def eval_batch(self, image_size: int) -> int:
        return self.eval_batch_size or eval_batch_for(image_size)


def eval_batch_for(image_size: int) -> int:
    """Inference batch size for square inputs of ``image_size``: 16 at 224 px, 256 at 32 px.

    Measured on 2 CPU cores with Lite0 at 224 px: batch 16 needs ~290 MB of activations and runs
    faster per image than batch 64 (~1.2 GB), so batches are capped by pixel count, not by images."""
    return max(1, min(256, (16 * 224 * 224) // (image_size * image_size)))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Raw inputs (uint8 NHWC pixels, or cached features) with labels as table rows.

    ``from_buffer`` marks replayed samples; ``buffer_logits`` are their logits at insertion."""

    inputs: torch.Tensor
    labels: torch.Tensor
    from_buffer: torch.Tensor
    buffer_logits: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Output:
    """What the model gave for a prepared batch."""

    x: torch.Tensor  # the prepared input (normalised and augmented images, or features)
    embeddings: torch.Tensor
    logits: torch.Tensor  # over all table rows


@dataclasses.dataclass(frozen=True)
class Context:
    """Everything plugins may read during one experience. What a plugin needs beyond it (replay's
    buffer on the device, distillation's teacher, EWC's Fisher) it keeps itself."""

    model: CvmModel
    buffer: ReplayBuffer  # the store's buffer as it came in; the replay plugins load and rebuild it
    seen: torch.Tensor  # table rows of every class seen so far, sorted
    old_classes: torch.Tensor  # rows seen before this experience
    current_classes: torch.Tensor  # rows present in this experience's data, sorted
    revisited_classes: torch.Tensor  # rows present in this experience's data and seen before, sorted
    new_data: ImageSet
    train_inputs: torch.Tensor  # the new data as the loop trains on it (pixels, or features), on device
    config: TrainConfig
    prep: Preprocessing
    device: torch.device
    cached: bool  # inputs are backbone features (frozen backbone)
    rng: np.random.Generator  # host randomness: the epoch's data order (drawn once per epoch)
    gen: torch.Generator  # on the training device: crops, flips and buffer draws never wait for the host
    task_index: int

    @functools.cached_property
    def seen_revisited(self) -> torch.Tensor:
        """bool per entry of ``seen``: a revisited class. Made once per experience (in an eager step):
        ``isin`` of a batch against many classes sorts and synchronises, which a CUDA graph cannot hold."""
        return torch.isin(self.seen, self.revisited_classes)

    @functools.cached_property
    def local_classes(self) -> torch.Tensor:
        """Table rows this store holds images of: this experience's classes and its buffer's, sorted
        (the rows a fleet device's images compete among, loss "local")."""
        held = {int(c) for c in self.current_classes.tolist()} | {int(c) for c in np.unique(self.buffer.labels)}
        return torch.as_tensor(sorted(held), dtype=torch.long, device=self.device)

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 pixels as the loop trains on them: on the device, or their backbone features when
        the backbone is frozen (computed once, in eval mode)."""
        if self.cached:
            return backbone_features(self.model, self.prep, pixels, self.config)
        return torch.from_numpy(pixels).to(self.device)

    def experts_for(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Oracle routing of training: the expert of each label's class (None without experts)."""
        experts = self.model.experts
        return None if experts is None else experts.experts_of(labels)

    def forward_head(
        self, model: CvmModel, x: torch.Tensor, experts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, logits) of ``model`` for a prepared input; ``experts`` routes each sample
        to one expert (models with per-task experts; None routes by the anchors, as at inference)."""
        f = x if self.cached else model.features(x)
        z = model.head.embed(f, experts)
        return z, model.head.logits_from_embedding(z)


def prepare_inputs(ctx: Context, inputs: torch.Tensor) -> torch.Tensor:
    """Raw training inputs (incoming or replayed) as the model takes them: normalised, augmented,
    channels-last; cached features pass through."""
    if ctx.cached:
        return inputs
    x = to_input(inputs, ctx.prep)
    if ctx.config.augment:
        fill = black_fill(ctx.prep, x.device) if ctx.config.crop_pad_black else None
        x = random_crop_flip(x, ctx.config.crop_pad, ctx.gen, fill)
    if ctx.config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class Plugin:
    """Base class: every hook is a no-op. A plugin owns its state (a buffer, a teacher, a Fisher
    estimate); the loop only calls the hooks, in the order of the plugin list."""

    name = "base"

    def check_head(self, head: str) -> None:
        """Refuse a store this plugin cannot train (raise UsageError), before anything runs."""

    def loss_kind(self, configured: str) -> str | None:
        """The classification loss this plugin trains with (see :func:`choose_loss`); None: no say."""
        return None

    def before_experience(self, ctx: Context) -> None:
        """Prepare per-experience values (never called twice for one experience)."""

    def extend_batch(self, ctx: Context, batch: Batch) -> Batch:
        return batch

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        return None

    def after_experience(self, ctx: Context) -> None:
        """Update the plugin's own state from the trained model (e.g. EWC's Fisher information)."""

    def kept_buffer(self) -> ReplayBuffer | None:
        """The replay buffer to keep for the next experience, if this plugin keeps one."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (persisted in the checkpoint)."""


@dataclasses.dataclass(frozen=True)
class ExperienceResult:
    buffer: ReplayBuffer
    final_loss: float
    steps: int
    images_seen: int


def restricted_logits(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    return logits.index_select(1, seen)


def targets_in(labels: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Positions of table-row labels within ``seen`` (sorted)."""
    return torch.searchsorted(seen, labels)


def choose_loss(configured: str, plugins: Sequence[Plugin]) -> str:
    """The configured classification loss when a plugin trains with it (replay and DER keep old
    classes in the softmax; fusion's task models only tell their own classes apart), else plain
    cross-entropy: with nothing to protect old rows, the plain loss is the honest baseline.
    "local" stays with or without plugins: it keeps a fleet device off the rows of classes other
    devices train, which no plugin protects."""
    if configured == LOCAL_LOSS:
        return configured
    kinds = [k for p in plugins if (k := p.loss_kind(configured)) is not None]
    return kinds[0] if kinds else "ce"


class Strategy:
    def __init__(
        self,
        model: CvmModel,
        prep: Preprocessing,
        plugins: Sequence[Plugin],
        config: TrainConfig,
        backend: TrainerBackend = EAGER,
    ) -> None:
        self.model = model
        self.prep = prep
        self.plugins = list(plugins)
        self.config = config
        self.backend = backend  # how steps run on the hardware (bench/speed.py's GPU speed-ups)
        self.device = torch.device(config.device)

    def features(self, pixels: np.ndarray) -> torch.Tensor:
        """Backbone features of uint8 pixels, in eval mode, batched (for a frozen backbone)."""
        return backbone_features(self.model, self.prep, pixels, self.config)

    def head_logits(self, feats: torch.Tensor) -> np.ndarray:
        """Logits (over all table rows) of cached backbone features, in eval mode."""
        return head_logits(self.model, feats, self.config)

    # ----- the loop ---------------------------------------------------------------------
    def train_experience(
        self,
        new_data: ImageSet,
        buffer: ReplayBuffer,
        seen: Sequence[int],
        old_classes: Sequence[int],
        task_index: int = 0,
    ) -> ExperienceResult:
        """Train on one experience. The plugins prepare (replay loads its buffer, distillation copies
        its teacher), the epochs run, the plugins finish in list order (EWC's Fisher, replay's new
        buffer, head balancing last)."""
        torch.manual_seed(self.config.seed)
        model = self._ready_model()
        # Lab (per-task experts): the new expert starts as the identity (its up-projection is 0).
        expert = add_task_expert(model, new_data, buffer) if model.experts is not None else None
        ctx = self._context(new_data, buffer, seen, old_classes, task_index)
        for plugin in self.plugins:
            plugin.before_experience(ctx)
        self.backend.prepare(model)  # after distillation copied its teacher from the plain model
        last_loss, steps, images = self._run_epochs(ctx)
        model.eval()
        if expert is not None:
            self._settle_anchors(ctx, expert)
        for plugin in self.plugins:
            plugin.after_experience(ctx)
        self._check_outputs_finite(new_data, task_index)
        kept = [b for p in self.plugins if (b := p.kept_buffer()) is not None]
        return ExperienceResult(
            buffer=kept[0] if kept else buffer,
            final_loss=float("nan") if last_loss is None else float(last_loss),
            steps=steps,
            images_seen=images,
        )

    def _ready_model(self) -> CvmModel:
        """The model on the training device, channels-last as configured."""
        model = self.model.to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model

    def _context(
        self, new_data: ImageSet, buffer: ReplayBuffer, seen: Sequence[int], old_classes: Sequence[int], task_index: int
    ) -> Context:
        cfg, device, cached = self.config, self.device, self.model.backbone_frozen
        if cached:
            log.info("backbone frozen: computing features once for %d new images", len(new_data))

        def rows(values: Sequence[int] | set[int]) -> torch.Tensor:
            return torch.as_tensor(sorted(values), dtype=torch.long, device=device)

        return Context(
            model=self.model,
            buffer=buffer,
            seen=rows(seen),
            old_classes=rows(old_classes),
            current_classes=rows(new_data.classes),
            revisited_classes=rows(set(new_data.classes) & {int(c) for c in old_classes}),
            new_data=new_data,
            train_inputs=backbone_features(self.model, self.prep, new_data.pixels, cfg)
            if cached
            else torch.from_numpy(new_data.pixels).to(device),
            config=cfg,
            prep=self.prep,
            device=device,
            cached=cached,
            rng=np.random.default_rng(cfg.seed),
            gen=torch.Generator(device=device).manual_seed(cfg.seed),
            task_index=task_index,
        )

    def _step(self, ctx: Context) -> tuple[StepFn, torch.optim.Optimizer, dict[int, int]]:
        """One training step on the new data at ``idx`` (the plugins extend the batch and add loss
        terms), its optimiser, and the images per step by batch length (replayed ones included)."""
        cfg, model = self.config, ctx.model
        labels = torch.from_numpy(ctx.new_data.labels).to(self.device)
        opt = make_optimizer(model.trainable_parameters(), cfg, capturable=self.backend.captures_steps)
        loss_kind = choose_loss(cfg.loss, self.plugins)
        batch_sizes: dict[int, int] = {}

        def step(idx: torch.Tensor) -> torch.Tensor:
            batch = Batch(
                inputs=ctx.train_inputs.index_select(0, idx),
                labels=labels.index_select(0, idx),
                from_buffer=torch.zeros(len(idx), dtype=torch.bool, device=self.device),
            )
            for plugin in self.plugins:
                batch = plugin.extend_batch(ctx, batch)
            batch_sizes[len(idx)] = len(batch.labels)
            x = prepare_inputs(ctx, batch.inputs)
            # Oracle routing while training (as HiDe-LLaVA): every sample through its class's expert.
            with self.backend.autocast(self.device):
                z, logits = ctx.forward_head(model, x, ctx.experts_for(batch.labels))
                out = Output(x=x, embeddings=z, logits=logits)
                loss = classification_loss(logits.float(), batch, ctx, loss_kind)
                for plugin in self.plugins:
                    extra = plugin.loss(ctx, batch, out)
                    if extra is not None:
                        loss = loss + extra.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return step, opt, batch_sizes

    def _run_epochs(self, ctx: Context) -> tuple[torch.Tensor | None, int, int]:
        """The configured epochs over the new data: (the last loss, steps, images trained on)."""
        cfg, n = self.config, len(ctx.new_data)
        step, opt, batch_sizes = self._step(ctx)
        run_step = self.backend.run_steps(step, cfg.batch_size, self.device, (ctx.gen,))
        total = cfg.epochs * max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
        bar = tqdm(total=total, desc=f"task {ctx.task_index}", unit="step", disable=not cfg.progress)
        last_loss: torch.Tensor | None = None
        steps, images = 0, 0
        ctx.model.train()
        for epoch in range(cfg.epochs):
            order = torch.from_numpy(ctx.rng.permutation(n)).to(self.device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                last_loss = run_step(idx)
                steps += 1
                images += batch_sizes[len(idx)]
                bar.update(1)
                if cfg.progress and steps % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{float(last_loss):.3f}")
            # One host sync per epoch: a diverged run stops here instead of training on (and
            # publishing) NaN weights, which would only show later as one class predicted.
            if last_loss is not None and not bool(torch.isfinite(last_loss)):
                raise TrainingDivergedError(
                    f"task {ctx.task_index}, epoch {epoch + 1}: the training loss is {float(last_loss)}; {DIVERGED_HINT}"
                )
        self.backend.finish(run_step, opt, ctx.task_index)
        bar.close()
        return last_loss, steps, images

    def _settle_anchors(self, ctx: Context, expert: int) -> None:
        """The task's anchor: the mean backbone feature of its data, before the buffer records
        logits and the head is balanced, both of which then go through the anchor routing."""
        experts = ctx.model.experts
        assert experts is not None
        experts.update_anchor(expert, ctx.train_inputs if ctx.cached else self.features(ctx.new_data.pixels))
        if not ctx.cached and len(ctx.buffer):
            # The backbone moved: earlier anchors are re-estimated from the replayed images.
            labels = torch.from_numpy(ctx.buffer.labels).to(self.device)
            refreshed = experts.refresh_anchors(self.features(ctx.buffer.pixels), labels, keep=expert)
            log.info("anchors of experts %s re-estimated from %d replayed images", refreshed, len(ctx.buffer))

    def _check_outputs_finite(self, data: ImageSet, task_index: int) -> None:
        """The per-epoch check reads each epoch's last loss, taken before that step's update: the last
        update (or head balancing) can still break the weights, so the trained model must give finite
        logits on a batch of this experience's images."""
        sample = data.pixels[: self.config.batch_size]
        logits = predict_logits(self.model, self.prep, sample, self.device, max(1, len(sample)))
        if not np.isfinite(logits).all():
            raise TrainingDivergedError(
                f"task {task_index}: after training the model's outputs are not finite; {DIVERGED_HINT}"
            )


def _eval_model(model: CvmModel, config: TrainConfig) -> CvmModel:
    model.eval()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


@torch.no_grad()
def backbone_features(model: CvmModel, prep: Preprocessing, pixels: np.ndarray, config: TrainConfig) -> torch.Tensor:
    """Backbone features of uint8 pixels, in eval mode, batched (for a frozen backbone)."""
    model = _eval_model(model, config)
    device = torch.device(config.device)
    out = []
    bs = config.eval_batch(prep.image_size)
    for i in range(0, len(pixels), bs):
        x = to_input(torch.from_numpy(pixels[i : i + bs]).to(device), prep)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model.features(x))
    if not out:
        return torch.zeros((0, feature_dim(model.backbone)), device=device)
    return torch.cat(out)


@torch.no_grad()
def head_logits(model: CvmModel, feats: torch.Tensor, config: TrainConfig) -> np.ndarray:
    """Logits (over all table rows) of cached backbone features, in eval mode."""
    model = _eval_model(model, config)
    bs = 1024
    out = [model.head(feats[i : i + bs]).float().cpu().numpy() for i in range(0, len(feats), bs)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    prep: Preprocessing,
    pixels: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
) -> np.ndarray:
    """Logits over all table rows for uint8 NHWC pixels, in eval mode (a CvmModel, or any module
    that maps normalised images to such logits, e.g. :class:`cvm_edge.lab.routing.FusedRoutedModel`)."""
    model.eval()
    bs = batch_size or eval_batch_for(prep.image_size)
    out = []
    for i in range(0, len(pixels), bs):
        # NHWC input: oneDNN's fast CPU path, and conv output follows the input's layout.
        x = to_input(torch.from_numpy(pixels[i : i + bs]).to(device), prep).contiguous(
            memory_format=torch.channels_last
        )
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def make_optimizer(
    params: Sequence[torch.nn.Parameter], cfg: TrainConfig, capturable: bool = False
) -> torch.optim.Optimizer:
    """The configured optimiser; ``capturable`` Adam keeps its step count on the device (for a backend
    that captures steps)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable)


class LossRows(Protocol):
    """The table rows of one experience that :func:`classification_loss` reads (a :class:`Context`;
    the fleet benchmark's simulated device gives its own)."""

    @property
    def seen(self) -> torch.Tensor: ...

    @property
    def current_classes(self) -> torch.Tensor: ...

    @property
    def seen_revisited(self) -> torch.Tensor: ...

    @property
    def local_classes(self) -> torch.Tensor: ...


def restricted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``labels`` (table rows, each one of ``rows``) among the sorted table rows
    ``rows`` only: the logits of every other row take no part and get no gradient."""
    return F.cross_entropy(restricted_logits(logits, rows), targets_in(labels, rows), reduction=reduction)


def classification_loss(logits: torch.Tensor, batch: Batch, ctx: LossRows, kind: str) -> torch.Tensor:
    """Cross-entropy over the seen classes; with ``ace`` the incoming images of new classes only
    over this experience's classes (replayed images and images of revisited classes keep the full set);
    with ``ce-all`` over every table row; with ``local`` every image over the classes this store
    holds images of.

    Why revisited classes take the full set: ACE restricts incoming images so that a new class,
    whose images vastly outnumber the replayed old ones, does not push the old rows away. A
    revisited class is an old class with a settled row; its new-domain images must be told apart
    from exactly the old classes they are confused with, and restricted to this experience's
    classes an update of one known class would be a one-way softmax: zero loss, nothing learned.
    An update of only known classes is therefore plain cross-entropy over the seen classes, with
    replay keeping the class balance.

    Why a fleet device takes ``local``: from its second round on, every class the fleet knows is
    "seen" on the device and its own classes are revisited, so under ``ace`` its images would
    compete among all of the fleet's classes and each device would push down the rows of the many
    classes it holds no image of, which other devices are training up at the same time: under
    label skew the devices' updates pull apart and their average drifts (the softmax restriction
    of FedRS, Li & Zhan, KDD 2021). The merge, not the device, tells those classes apart.

    Both terms are computed for every sample and one is selected per sample with ``where``, so no
    boolean indexing forces the host to wait for the device."""
    if kind == "ce-all":
        return F.cross_entropy(logits, batch.labels)
    if kind == LOCAL_LOSS:
        return restricted_cross_entropy(logits, batch.labels, ctx.local_classes)
    seen_ce = restricted_cross_entropy(logits, batch.labels, ctx.seen, reduction="none")
    if kind == "ce":
        return seen_ce.mean()
    current = ctx.current_classes
    # Replayed labels may lie outside this experience's classes: clamp keeps their (unused) index valid.
    pos = targets_in(batch.labels, current).clamp_max(len(current) - 1)
    new_ce = F.cross_entropy(restricted_logits(logits, current), pos, reduction="none")
    full = batch.from_buffer | ctx.seen_revisited.index_select(0, targets_in(batch.labels, ctx.seen))
    return torch.where(full, seen_ce, new_ce).mean()
