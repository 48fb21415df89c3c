"""DER++ plugin: the loss is alpha * MSE to stored logits on one buffer batch + beta * CE on another."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import der_context
from cvm_edge.augment import to_input
from cvm_edge.data import ImageSet
from cvm_edge.model import ModelConfig, build_model
from cvm_edge.plugins import HeadBalancePlugin, PluginOptions, make_plugins
from cvm_edge.plugins.der import DerPlugin
from cvm_edge.strategy import Batch, Context, Output, Strategy, TrainConfig, classification_loss


def _setup(alpha: float, beta: float) -> tuple[Context, DerPlugin]:
    torch.manual_seed(0)
    table = np.eye(4, 8, dtype=np.float32)
    model = build_model(ModelConfig("resnet10_cifar_slim", 16, head="linear"), table).eval()
    ctx = der_context(model)
    plugin = DerPlugin(alpha, beta)
    plugin.before_experience(ctx)
    return ctx, plugin


def test_der_loss_matches_its_definition() -> None:
    ctx, plugin = _setup(0.3, 0.5)
    dummy = Output(x=torch.zeros(1), embeddings=torch.zeros(1), logits=torch.zeros(1))
    batch = Batch(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool))
    loss = plugin.loss(ctx, batch, dummy)
    assert loss is not None and torch.isfinite(loss)
    # replay the same draws by hand
    gen = torch.Generator().manual_seed(7)
    i1, i2 = (torch.randperm(12, generator=gen)[:5].numpy() for _ in range(2))
    with torch.no_grad():
        out = ctx.model(to_input(torch.from_numpy(ctx.buffer.pixels[np.concatenate([i1, i2])]), ctx.prep))
    mse = F.mse_loss(out[:5], torch.from_numpy(ctx.buffer.logits[i1].astype(np.float32)))
    ce = F.cross_entropy(out[5:], torch.from_numpy(ctx.buffer.labels[i2]))
    assert float(loss.detach()) == pytest.approx(float(0.3 * mse + 0.5 * ce), rel=1e-4, abs=1e-5)


def test_der_is_registered_and_trains_through_the_strategy() -> None:
    plugin, balance = make_plugins(["der"], PluginOptions(der_alpha=0.2, der_beta=0.0))
    assert isinstance(plugin, DerPlugin) and plugin.alpha == 0.2 and plugin.beta == 0.0
    # head balancing runs last, on the same replay memory
    assert isinstance(balance, HeadBalancePlugin) and balance.memory is plugin.memory
    ctx, _ = _setup(0.1, 0.5)
    model = ctx.model
    strategy = Strategy(model, ctx.prep, [DerPlugin()], TrainConfig(epochs=1, progress=False, balance_epochs=0))
    new = ImageSet(ctx.buffer.pixels[:6], np.full(6, 2, np.int64))
    result = strategy.train_experience(new, ctx.buffer, [0, 1, 2], [0, 1], task_index=1)
    assert result.steps == 1 and np.isfinite(result.final_loss)
    assert result.buffer.logits.shape[1] == 4 and 2 in set(result.buffer.labels.tolist())


def test_ce_all_takes_the_softmax_over_every_table_row_in_the_stream_and_replay_terms() -> None:
    """loss="ce-all" (mammoth's class-incremental DER++): unseen rows enter both cross-entropies."""
    ctx, plugin = _setup(0.0, 1.0)  # the replay cross-entropy alone
    seen = torch.tensor([0, 1, 2])  # row 3 not seen yet
    losses = {}
    for kind in ("ce", "ce-all"):
        c = dataclasses.replace(
            ctx, seen=seen, config=dataclasses.replace(ctx.config, loss=kind), gen=torch.Generator().manual_seed(7)
        )
        dummy = Output(x=torch.zeros(1), embeddings=torch.zeros(1), logits=torch.zeros(1))
        batch = Batch(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool))
        loss = plugin.loss(c, batch, dummy)
        assert loss is not None
        losses[kind] = float(loss.detach())
    gen = torch.Generator().manual_seed(7)
    _, i2 = (torch.randperm(12, generator=gen)[:5].numpy() for _ in range(2))
    with torch.no_grad():
        out = ctx.model(to_input(torch.from_numpy(ctx.buffer.pixels[i2]), ctx.prep))
    y = torch.from_numpy(ctx.buffer.labels[i2])
    assert losses["ce-all"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-4)
    assert losses["ce"] == pytest.approx(float(F.cross_entropy(out[:, :3], y)), rel=1e-4)
    assert losses["ce-all"] > losses["ce"]  # one more row in every softmax
    # the stream term: the same rule in classification_loss
    logits = torch.tensor([[2.0, 0.0, 0.0, 3.0]])
    b = Batch(torch.zeros(1), torch.tensor([0]), torch.zeros(1, dtype=torch.bool))
    c = dataclasses.replace(ctx, seen=seen)
    assert float(classification_loss(logits, b, c, "ce-all")) == pytest.approx(float(F.cross_entropy(logits, b.labels)))
    assert float(classification_loss(logits, b, c, "ce")) == pytest.approx(
        float(F.cross_entropy(logits[:, :3], b.labels))
    )
    assert TrainConfig(loss="ce-all").loss == "ce-all"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_head_balancing_uses_the_runs_optimiser_at_half_its_rate(
    optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SGD run's rate (0.1) would wreck the head under Adam: balancing follows ``cfg.optimizer``."""
    import cvm_edge.plugins.balance as balance_module
    import cvm_edge.strategy as strategy_module

    made: list[tuple[str, float, bool]] = []
    real = strategy_module.make_optimizer

    def spy(params: Sequence[torch.nn.Parameter], cfg: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
        made.append((cfg.optimizer, cfg.lr, capturable))
        return real(params, cfg, capturable)

    monkeypatch.setattr(strategy_module, "make_optimizer", spy)
    monkeypatch.setattr(balance_module, "make_optimizer", spy)
    ctx, _ = _setup(0.1, 0.5)
    cfg = TrainConfig(epochs=1, progress=False, balance_epochs=1, optimizer=optimizer, lr=0.1, momentum=0.0)
    strategy = Strategy(ctx.model, ctx.prep, make_plugins(["der"]), cfg)
    new = ImageSet(ctx.buffer.pixels[:6], np.full(6, 2, np.int64))
    strategy.train_experience(new, ctx.buffer, [0, 1, 2], [0, 1], task_index=1)
    assert made == [(optimizer, 0.1, False), (optimizer, 0.05, False)]  # training, then head balancing
