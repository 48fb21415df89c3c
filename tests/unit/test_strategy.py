"""The training loop itself (cvm_edge.strategy.Strategy): hook order, step and image counts, the
loss it picks, the buffer it returns, and that it learns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

import numpy as np
import pytest
import torch

from cvm_edge.buffer import ReplayBuffer
from cvm_edge.data import ImageSet
from cvm_edge.errors import TrainingDivergedError
from cvm_edge.model import CvmModel, ModelConfig, build_model
from cvm_edge.plugins import DistillPlugin, make_plugins
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import Batch, Context, Output, Plugin, Strategy, TrainConfig, choose_loss
from cvm_edge.trainer_backend import EAGER, StepFn

SIZE = 16


class Spy(Plugin):
    """Records every hook call as (name, hook); checks what each hook may rely on."""

    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name = name
        self.calls = calls

    def before_experience(self, ctx: Context) -> None:
        self.calls.append((self.name, "before"))

    def extend_batch(self, ctx: Context, batch: Batch) -> Batch:
        assert ctx.model.training
        self.calls.append((self.name, "extend"))
        return batch

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        assert out.logits.shape == (len(batch.labels), ctx.model.table_rows)
        self.calls.append((self.name, "loss"))
        return None

    def after_experience(self, ctx: Context) -> None:
        assert not ctx.model.training  # plugins finish on the trained model in eval mode
        self.calls.append((self.name, "after"))


def _data(classes: list[int], per_class: int, seed: int = 0) -> ImageSet:
    """Images whose class is their mean colour (learnable in a few steps), with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)
    noise = rng.integers(-15, 16, (len(labels), SIZE, SIZE, 3))
    return ImageSet(np.clip(base + noise, 0, 255).astype(np.uint8), labels)


class Backend:
    """A trainer backend that records how the loop hands it its steps (bench/speed.py's hooks)."""

    captures_steps = False

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.wrapped: StepFn | None = None

    def prepare(self, model: CvmModel) -> None:
        self.calls.append("prepare")

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        self.calls.append("autocast")
        yield

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        return self._autocast()

    def run_steps(
        self, step: StepFn, batch_size: int, device: torch.device, generators: tuple[torch.Generator, ...]
    ) -> StepFn:
        self.calls.append(f"run_steps {batch_size} {len(generators)}")

        def counted(idx: torch.Tensor) -> torch.Tensor:
            self.calls.append("step")
            return step(idx)

        self.wrapped = counted
        return counted

    def finish(self, run_step: StepFn, optimizer: torch.optim.Optimizer, task_index: int) -> None:
        assert run_step is self.wrapped  # what it handed out, so it can release a captured graph
        self.calls.append(f"finish {task_index}")


def _strategy(plugins: list[Plugin], **cfg: object) -> Strategy:
    torch.manual_seed(0)
    table = np.eye(4, 8, dtype=np.float32)
    model = build_model(ModelConfig("resnet10_cifar_slim", SIZE), table)
    options = {"epochs": 2, "batch_size": 8, "progress": False, "augment": False, **cfg}
    return Strategy(model, Preprocessing(SIZE), plugins, TrainConfig(**options))  # type: ignore[arg-type]


def test_hooks_run_in_list_order_once_per_experience_and_once_per_step() -> None:
    calls: list[tuple[str, str]] = []
    strategy = _strategy([Spy("a", calls), Spy("b", calls)])
    result = strategy.train_experience(_data([0, 1], 10), ReplayBuffer.empty(0, SIZE), [0, 1], [])
    assert result.steps == 2 * 3  # 20 images in batches of 8: 3 steps per epoch
    assert result.images_seen == 2 * 20
    per_step = [("a", "extend"), ("b", "extend"), ("a", "loss"), ("b", "loss")]
    assert calls == [("a", "before"), ("b", "before"), *per_step * 6, ("a", "after"), ("b", "after")]


def test_replay_adds_its_batch_to_every_step_and_returns_the_rebuilt_buffer() -> None:
    strategy = _strategy(make_plugins(["replay"]), replay_batch_size=4, balance_epochs=0)
    first = strategy.train_experience(_data([0, 1], 10), ReplayBuffer.empty(12, SIZE), [0, 1], [])
    assert first.images_seen == 2 * 20  # nothing to replay yet
    assert sorted(set(first.buffer.labels.tolist())) == [0, 1] and len(first.buffer) == 12
    second = strategy.train_experience(_data([2], 10, seed=1), first.buffer, [0, 1, 2], [0, 1], task_index=1)
    assert second.steps == 2 * 2 and second.images_seen == 2 * (10 + 2 * 4)
    assert sorted(set(second.buffer.labels.tolist())) == [0, 1, 2] and len(second.buffer) == 12
    assert first.buffer.labels.tolist() != second.buffer.labels.tolist()


def test_without_a_replaying_plugin_the_buffer_passes_through_and_the_loss_is_plain_cross_entropy() -> None:
    buffer = ReplayBuffer.empty(0, SIZE)
    result = _strategy([]).train_experience(_data([0, 1], 10), buffer, [0, 1], [])
    assert result.buffer is buffer
    assert choose_loss("ace", []) == "ce"
    assert choose_loss("ace", make_plugins(["distill", "ewc"])) == "ce"
    assert choose_loss("ace", make_plugins(["ewc", "replay"])) == "ace"
    assert choose_loss("ce-all", make_plugins(["der"])) == "ce-all"


def test_head_balancing_runs_after_every_other_plugin_finished() -> None:
    calls: list[tuple[str, str]] = []
    plugins = make_plugins(["replay"])
    assert [p.name for p in plugins] == ["replay", "balance"]
    strategy = _strategy([*plugins[:1], Spy("late", calls), plugins[1]], balance_epochs=1)
    head_before: dict[str, torch.Tensor] = {}

    class Snapshot(Spy):
        def after_experience(self, ctx: Context) -> None:
            head_before.update({k: v.clone() for k, v in ctx.model.head.state_dict().items()})

    strategy.plugins.insert(2, Snapshot("snap", calls))
    strategy.train_experience(_data([0, 1], 10), ReplayBuffer.empty(8, SIZE), [0, 1], [])
    moved = [k for k, v in strategy.model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert moved  # the head moved after the other plugins saw the trained model
    assert ("late", "after") in calls


def test_distillation_copies_its_teacher_when_old_classes_exist_and_frees_it_after() -> None:
    seen: list[bool] = []

    class Watch(Plugin):
        def before_experience(self, ctx: Context) -> None:
            seen.append(distill.teacher is not None)

    distill = DistillPlugin()
    strategy = _strategy([distill, Watch()])
    strategy.train_experience(_data([0, 1], 10), ReplayBuffer.empty(0, SIZE), [0, 1], [])
    strategy.train_experience(_data([2], 10), ReplayBuffer.empty(0, SIZE), [0, 1, 2], [0, 1], task_index=1)
    assert seen == [False, True] and distill.teacher is None


def test_the_loop_learns_a_separable_task() -> None:
    strategy = _strategy([], epochs=8, lr=3e-3)
    data = _data([0, 1, 2], 12)
    strategy.train_experience(data, ReplayBuffer.empty(0, SIZE), [0, 1, 2], [])
    pred = strategy.head_logits(strategy.features(data.pixels))[:, :3].argmax(axis=1)
    assert (pred == data.labels).mean() >= 0.9


def test_a_diverging_run_stops_with_a_clear_error() -> None:
    strategy = _strategy([], optimizer="sgd", lr=1e12, momentum=0.0)
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        strategy.train_experience(_data([0, 1], 10), ReplayBuffer.empty(0, SIZE), [0, 1], [])


def test_a_store_that_replayed_before_is_balanced_on_its_buffer_without_a_replaying_plugin() -> None:
    """`cvm update --plugins distill` on a store whose buffer holds images: no plugin rebuilds the
    buffer, it is kept as it came, and the head is still balanced on it (as before plugins owned it)."""
    import copy

    first = _strategy(make_plugins(["replay"]), balance_epochs=0)
    buffer = first.train_experience(_data([0, 1], 10), ReplayBuffer.empty(8, SIZE), [0, 1], []).buffer
    assert len(buffer) == 8
    heads = []
    for epochs in (0, 1):
        model = copy.deepcopy(first.model)
        cfg = TrainConfig(epochs=1, batch_size=8, progress=False, augment=False, balance_epochs=epochs)
        strategy = Strategy(model, Preprocessing(SIZE), make_plugins(["distill"]), cfg)
        result = strategy.train_experience(_data([2], 10, seed=1), buffer, [0, 1, 2], [0, 1], task_index=1)
        assert result.buffer is buffer  # nothing replayed: the buffer passes through, not rebuilt
        heads.append({k: v.clone() for k, v in model.head.state_dict().items()})
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_every_step_goes_through_the_trainer_backend_and_the_default_is_eager() -> None:
    calls: list[str] = []
    strategy = _strategy([Spy("p", [])], balance_epochs=0)
    assert strategy.backend is EAGER
    strategy.backend = Backend(calls)
    result = strategy.train_experience(_data([0, 1], 10), ReplayBuffer.empty(0, SIZE), [0, 1], [], task_index=3)
    assert result.steps == 6
    # prepared once, steps wrapped once, each step's forward under the backend's autocast, then finished
    assert calls == ["prepare", "run_steps 8 1", *["step", "autocast"] * 6, "finish 3"]
