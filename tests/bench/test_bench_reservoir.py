"""The paper's DER++ buffer in the harness (bench.reservoir): algorithm R on the device, logits
kept from the moment of insertion, no replay loss while the reservoir is empty."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch

from bench import run as bench_run
from bench.reservoir import ReservoirDerPlugin
from cvm_edge.strategy import Batch, Context, Output

TINY = ["--smoke", "--demo", "--train-per-class", "30", "--test-per-class", "10", "--threads", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def _plugin(capacity: int, width: int = 3) -> tuple[ReservoirDerPlugin, Context]:
    plugin = ReservoirDerPlugin(capacity)
    plugin.inputs = torch.zeros((capacity + 1, 1, 1, 1), dtype=torch.uint8)
    plugin.labels = torch.zeros(capacity + 1, dtype=torch.long)
    plugin.logits = torch.zeros((capacity + 1, width))
    plugin.seen_count = torch.zeros((), dtype=torch.long)
    # What the plugin reads of a Context; inputs are "cached", so replayed rows reach the head as
    # they are, and the head is one weight row per table row (ones): logits = pixel value.
    w = torch.ones(1, width, requires_grad=True)
    ctx = SimpleNamespace(
        device=torch.device("cpu"),
        gen=torch.Generator().manual_seed(0),
        config=SimpleNamespace(replay_batch_size=4, augment=False, channels_last=False, loss="ce"),
        cached=True,
        seen=torch.arange(width),
        model=None,
        weight=w,
        experts_for=lambda labels: None,
        forward_head=lambda model, x, experts: (x, x.float().view(len(x), 1) @ w),
    )
    return plugin, cast(Context, ctx)


def _offer(plugin: ReservoirDerPlugin, ctx: Context, ids: torch.Tensor) -> None:
    """Offer samples whose pixel, label and logits all carry their stream id."""
    batch = Batch(inputs=(ids % 256).to(torch.uint8).view(-1, 1, 1, 1), labels=ids, from_buffer=ids < 0)
    out = Output(x=torch.zeros(0), embeddings=torch.zeros(0), logits=ids.float()[:, None].repeat(1, 3))
    plugin._offer(ctx, batch, out)


def test_reservoir_fills_in_order_then_keeps_each_sample_with_probability_capacity_over_seen() -> None:
    plugin, ctx = _plugin(10)
    _offer(plugin, ctx, torch.arange(4))
    _offer(plugin, ctx, torch.arange(4, 8))
    assert plugin.labels[:8].tolist() == list(range(8)) and int(plugin.seen_count) == 8
    # logits are those of the moment of insertion, row by row with the sample
    assert torch.equal(plugin.logits[:8, 0], plugin.labels[:8].float())
    counts = np.zeros(100)
    for trial in range(400):
        plugin, ctx = _plugin(10)
        ctx.gen.manual_seed(trial)
        for start in range(0, 100, 8):
            _offer(plugin, ctx, torch.arange(start, min(start + 8, 100)))
        kept = plugin.labels[:10]
        assert int(plugin.seen_count) == 100 and len(set(kept.tolist())) == 10  # 10 distinct stream samples
        assert torch.equal(plugin.logits[:10, 0], kept.float()) and torch.equal(
            plugin.inputs[:10, 0, 0, 0], kept.to(torch.uint8)
        )
        counts[kept.numpy()] += 1
    # algorithm R: every sample of the stream is kept with probability 10/100, early or late
    rate = counts / 400
    assert abs(rate[:50].mean() - 0.1) < 0.02 and abs(rate[50:].mean() - 0.1) < 0.02
    assert rate.max() < 0.25
    assert counts[10] > 0  # the first sample past the capacity competes too (no off-by-one)


def test_samples_of_one_batch_drawn_to_the_same_row_leave_the_later_one_whole() -> None:
    plugin, ctx = _plugin(2)
    _offer(plugin, ctx, torch.arange(2))
    state = ctx.gen.get_state()
    _offer(plugin, ctx, torch.arange(2, 42))  # 40 samples for 2 rows: many collisions in one batch
    # the same draws again: row r ends with the last sample of the batch that drew it (else its old one)
    pos = torch.arange(2, 42)
    j = (torch.rand(40, generator=torch.Generator().set_state(state)) * (pos + 1).float()).long()
    expect = [max([int(p) for p, r in zip(pos, j, strict=True) if r == row], default=row) for row in range(2)]
    assert min(sum(int(r) == row for r in j) for row in range(2)) >= 1  # both rows were drawn in this batch
    assert plugin.labels[:2].tolist() == expect
    assert plugin.logits[:2, 0].tolist() == [float(e) for e in expect]
    assert plugin.inputs[:2, 0, 0, 0].tolist() == expect


def test_empty_reservoir_gives_zero_replay_loss_and_bytes_then_both_grow() -> None:
    plugin, ctx = _plugin(5)
    w: torch.Tensor = cast(Any, ctx).weight
    empty = plugin._replay_loss(ctx)
    assert plugin.nbytes == 0 and float(empty.detach()) == 0.0
    _offer(plugin, ctx, torch.arange(3))
    assert plugin.nbytes == 3 * (1 + 8 + 3 * 4)
    filled = plugin._replay_loss(ctx)
    assert torch.isfinite(filled) and float(filled.detach()) > 0
    filled.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="at least one"):
        ReservoirDerPlugin(0)


def test_reservoir_methods_run_in_the_harness_and_count_their_bytes(tmp_path: Path) -> None:
    argv = ["--protocol", "cifar10-5", "--method", "derpp-reservoir", "--buffer", "20"]
    assert bench_run.main([*argv, "--out", str(tmp_path), *TINY]) == 0
    rec: dict[str, Any] = json.loads((tmp_path / "smoke" / "cifar10-5" / "derpp-reservoir-b20-s0.json").read_text())
    assert rec["buffer"] == 20 and "reservoir" in rec["hyperparameters"]["buffer_policy"]
    assert [t["buffer_size"] for t in rec["per_task"]] == [20, 20]
    # 20 rows of a 32 px image, an int64 label and float32 logits over the 10 table rows
    assert rec["stored_bytes"]["buffer"] == rec["stored_bytes"]["total"] == 20 * (32 * 32 * 3 + 8 + 10 * 4)
    assert rec["final_avg_acc"] is not None
