"""The fusion plugin in the real training loop and the routed model built from its state.

A real timm backbone (resnet10_cifar_slim, 32 px) learns three tasks of two Fashion-MNIST classes
each through the Strategy with the fusion plugin (a few images, one epoch: behaviour, not accuracy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.datasets import demo_dataset
from cvm_edge.augment import to_input
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.data import ImageSet
from cvm_edge.errors import UsageError
from cvm_edge.lab.fusion_state import FusionState, float_stats, model_with, trainable_params
from cvm_edge.lab.routing import FusedRoutedModel
from cvm_edge.model import CvmModel, ModelConfig, build_model
from cvm_edge.plugins import FusionPlugin, make_plugins, parse_plugin_list
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import Strategy, TrainConfig

TASKS = ((0, 1), (2, 3), (4, 5))
PREP = Preprocessing(image_size=32)


@dataclasses.dataclass
class Trained:
    model: CvmModel
    plugin: FusionPlugin
    base_params: dict[str, torch.Tensor]
    test: ImageSet
    history: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]  # model after each task


@pytest.fixture(scope="module")
def trained() -> Trained:
    torch.manual_seed(0)
    data = demo_dataset(32)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 32)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    model = build_model(ModelConfig(backbone="resnet10_cifar_slim", image_size=32, mapper_hidden=64), table)
    base = trainable_params(model)
    plugin, _balance = make_plugins(["fusion"])
    assert isinstance(plugin, FusionPlugin)
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False, balance_epochs=0)
    seen: list[int] = []
    history = []
    for t, classes in enumerate(TASKS):
        keep = np.concatenate([np.flatnonzero(data.train.labels == c)[:24] for c in classes])
        task = ImageSet(data.train.images[keep], data.train.labels[keep])
        old, seen = list(seen), sorted({*seen, *classes})
        Strategy(model, PREP, [plugin], dataclasses.replace(cfg, seed=t)).train_experience(
            task, ReplayBuffer.empty(0, 32), seen, old, task_index=t
        )
        history.append((trainable_params(model), float_stats(model)))
    keep = np.concatenate([np.flatnonzero(data.test.labels == c)[:4] for c in range(6)])
    return Trained(model, plugin, base, ImageSet(data.test.images[keep], data.test.labels[keep]), history)


def test_after_every_task_the_model_is_the_unified_model(trained: Trained) -> None:
    state = trained.plugin.state
    assert state is not None and state.n_tasks == 3 and state.task_classes == TASKS
    assert all(torch.equal(state.base[k], trained.base_params[k]) for k in state.base)  # base = before task 0
    params, stats = trained.history[-1]
    unified = state.unified_params()
    assert all(torch.equal(params[k], unified[k]) for k in unified)
    mean_stats = state.unified_stats()
    assert all(torch.equal(stats[k], mean_stats[k]) for k in mean_stats)
    # the unified model moved away from the base, and BatchNorm statistics are kept per task
    assert any(not torch.equal(unified[k], state.base[k]) for k in unified)
    assert all(len(s) > 0 for s in state.task_stats)
    reports = trained.plugin.reports
    assert [len(r["rescales"]) for r in reports] == [1, 2, 3]
    assert reports[0]["rescales"] == [1.0] and reports[0]["rebuild_error_new_task"] == 0.0  # one task: exact
    assert 0 < reports[2]["agreement_new_task"] < 1


def test_state_survives_the_checkpoint_format(trained: Trained) -> None:
    state = trained.plugin.state
    assert state is not None
    flat = state.to_tensors()
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    back = FusionState.from_tensors(flat)
    assert back.task_classes == state.task_classes and back.unified is not None and state.unified is not None
    assert back.unified.rescales == state.unified.rescales
    for t in range(3):
        a, b = back.task_params(t), state.task_params(t)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.prototypes, state.prototypes)  # type: ignore[arg-type]
    fresh = FusionPlugin()
    fresh.load_state_dict(trained.plugin.state_dict())
    assert fresh.state is not None and fresh.state.nbytes() == state.nbytes()


def test_bytes_are_those_of_packed_masks_and_float32_deltas(trained: Trained) -> None:
    state = trained.plugin.state
    assert state is not None
    n = {k: v.numel() for k, v in state.base.items()}
    b = state.nbytes()
    assert b.base == b.unified == 4 * sum(n.values())
    assert b.masks == 3 * sum((c + 7) // 8 for c in n.values())
    assert b.rescales == 12 and b.prototypes == 3 * 4 * state.prototypes.shape[1]  # type: ignore[union-attr]
    assert b.task_stats == sum(4 * v.numel() for s in state.task_stats for v in s.values())
    assert b.total == b.base + b.unified + b.masks + b.rescales + b.task_stats + b.prototypes


def _x(trained: Trained) -> torch.Tensor:
    return to_input(torch.from_numpy(trained.test.pixels), PREP)


@torch.no_grad()
def test_routed_model_rebuilds_each_task_and_averages_the_chosen_ones(trained: Trained) -> None:
    state = trained.plugin.state
    assert state is not None and state.unified is not None
    x = _x(trained)
    routed = FusedRoutedModel(trained.model, state, k=3, combine="logits")
    for t, m in enumerate(routed.tasks):
        # each task model holds base + rescale_t * mask_t * unified, bit for bit
        p = dict(m.named_parameters())
        r = torch.tensor(state.unified.rescales[t], dtype=torch.float32)
        for k, delta in state.unified.delta.items():
            expected = state.base[k] + r * (state.unified.masks[t][k].unpack() * delta)
            assert torch.equal(p[k].detach(), expected), (t, k)
    refs = [model_with(trained.model, state.task_params(t), state.full_stats(t))(x) for t in range(3)]
    # k = T: every task is chosen, the routed logits are their plain mean
    torch.testing.assert_close(routed(x), torch.stack(refs).mean(0), rtol=0, atol=1e-5)
    # k = 1 with the task-restricted mixture: the routed output is the chosen task's own-class log-softmax
    top1 = FusedRoutedModel(trained.model, state, k=1)
    w = top1.weights(x)
    assert torch.equal(w.sum(1), torch.ones(len(x))) and set(w.unique().tolist()) <= {0.0, 1.0}
    chosen = top1.scores(x).argmax(1)
    assert torch.equal(w.argmax(1), chosen)
    out = top1(x)
    for i, t in enumerate(chosen.tolist()):
        own = list(TASKS[t])
        expected = F.log_softmax(refs[t][i, own], dim=0)
        torch.testing.assert_close(out[i, own], expected, rtol=0, atol=1e-5)
        others = [c for c in range(10) if c not in own]
        assert (out[i, others] < -20).all()  # classes of unchosen tasks get log(1e-12)
    # routing is not constant: the images of six classes do not all go to one task
    assert len(chosen.unique()) > 1
    # with_k shares the rebuilt models (no copies) and routes like a model built for that k
    three = FusedRoutedModel(trained.model, state, k=3)
    shared = three.with_k(1)
    assert shared.tasks is three.tasks and three.k == 3 and shared.k == 1
    assert torch.equal(shared(x), out)


@torch.no_grad()
def test_routing_scores_are_cosines_to_centred_base_prototypes(trained: Trained) -> None:
    state = trained.plugin.state
    assert state is not None and state.prototypes is not None
    routed = FusedRoutedModel(trained.model, state, k=2)
    x = _x(trained)
    base_model = model_with(trained.model, state.base, state.base_stats)
    f = base_model.features(x)
    center = state.prototypes.mean(0)
    expected = F.normalize(f - center, dim=-1) @ F.normalize(state.prototypes - center, dim=-1).t()
    torch.testing.assert_close(routed.scores(x), expected, rtol=0, atol=1e-5)
    w = routed.weights(x)
    assert torch.equal((w > 0).sum(1), torch.full((len(x),), 2))


def test_fusion_refuses_a_buffer_that_head_balancing_would_train_on() -> None:
    data = demo_dataset(32)
    keep = np.concatenate([np.flatnonzero(data.train.labels == c)[:4] for c in (0, 1)])
    task = ImageSet(data.train.images[keep], data.train.labels[keep])
    buffer = ReplayBuffer.empty(8, 32).updated(task, None, seed=0, task=0)  # left by earlier replay updates
    model = build_model(ModelConfig("resnet10_cifar_slim", 32, mapper_hidden=0), np.eye(10, 16, dtype=np.float32))
    before = trainable_params(model)
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, balance_epochs=3)
    with pytest.raises(UsageError, match="--balance-epochs 0"):
        Strategy(model, PREP, [FusionPlugin()], cfg).train_experience(task, buffer, [0, 1], [], 0)
    assert all(torch.equal(before[k], v) for k, v in trainable_params(model).items())  # refused before training
    plugin = FusionPlugin()
    no_balance = dataclasses.replace(cfg, balance_epochs=0)
    Strategy(model, PREP, [plugin], no_balance).train_experience(task, buffer, [0, 1], [], 0)
    assert plugin.state is not None and plugin.state.n_tasks == 1


def test_fusion_refuses_replay_and_bad_options() -> None:
    assert parse_plugin_list("fusion,distill") == ["fusion", "distill"]
    for text in ("replay,fusion", "fusion,der"):
        with pytest.raises(ValueError, match="data-free"):
            parse_plugin_list(text)
    with pytest.raises(ValueError, match="start"):
        FusionPlugin(start="middle")
    with pytest.raises(ValueError, match="at least one fused task"):
        FusedRoutedModel(
            build_model(ModelConfig("resnet10_cifar_slim", 32), np.eye(4, dtype=np.float32)),
            FusionState({"a": torch.zeros(1)}, {}),
        )
