"""`er` and `derpp` as Mammoth trains them (issue 20): reservoir buffer filled while the stream
passes, logits of the training pass recorded at insertion, replay from the second step, draws
without replacement, DER++'s two replay passes, cross-entropy over all outputs, CIFAR-10 input
statistics with black crop padding, PyTorch's default initialisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock

from bench import run as bench_run
from bench.mammoth import CIFAR10_MEAN, CIFAR10_STD, preprocessing, reset_to_torch_defaults
from bench.methods import METHODS
from bench.protocols import PROTOCOLS, build_scenario
from bench.reservoir import ReservoirDerPlugin, ReservoirReplayPlugin
from cvm_edge.augment import black_fill, random_crop_flip, to_input
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.data import ImageSet
from cvm_edge.model import ModelConfig, build_model
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import Batch, Context, Output, Plugin, Strategy, TrainConfig

TINY = ["--smoke", "--demo", "--train-per-class", "30", "--test-per-class", "10", "--threads", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


class Spy(Plugin):
    """Records what each training step saw: the batch (after replay joined it) and the logits."""

    name = "spy"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.logits: list[torch.Tensor] = []

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        self.batches.append(batch)
        self.logits.append(out.logits.detach().float().clone())
        return None


def _model() -> Any:
    torch.manual_seed(0)
    return build_model(ModelConfig("resnet10_cifar_slim", 16, head="linear"), np.eye(4, 8, dtype=np.float32))


def _data(n: int, label: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), np.full(n, label, np.int64))


def _strategy(model: Any, plugins: list[Plugin], batch: int = 4, loss: str = "ce-all") -> Strategy:
    cfg = TrainConfig(
        epochs=1, batch_size=batch, replay_batch_size=batch, optimizer="sgd", lr=0.01, momentum=0.0,
        loss=loss, balance_epochs=0, progress=False, augment=False,
    )  # fmt: skip
    return Strategy(model, Preprocessing(16), plugins, cfg)


def _empty() -> ReplayBuffer:
    return ReplayBuffer.empty(0, 16)


def test_er_replays_from_the_second_step_distinct_filled_rows_and_offers_only_the_stream() -> None:
    spy, er = Spy(), ReservoirReplayPlugin(capacity=6)
    model = _model()
    data = _data(12, 0)
    data = ImageSet(data.pixels, np.arange(12) % 2)
    _strategy(model, [er, spy]).train_experience(data, _empty(), [0, 1], [], task_index=0)
    sizes = [len(b.labels) for b in spy.batches]
    assert sizes == [4, 8, 8]  # nothing to replay at the very first step, then 4 + 4
    assert [int(b.from_buffer.sum()) for b in spy.batches] == [0, 4, 4]
    # the second step drew the 4 rows the first step filled (without replacement: each once)
    second = spy.batches[1]
    assert sorted(second.inputs[4:].view(4, -1)[:, 0].tolist()) == sorted(
        spy.batches[0].inputs.view(4, -1)[:, 0].tolist()
    )
    # only stream samples are offered: 12 seen, 6 kept, every kept row one of this stream's images
    assert int(er.seen_count) == 12 and er.offered == 12 and len(er) == 6
    stream = {bytes(p.tobytes()) for p in data.pixels}
    assert all(bytes(er.inputs[i].numpy().tobytes()) in stream for i in range(6))


def test_reservoir_draws_are_distinct_filled_rows() -> None:
    er = ReservoirReplayPlugin(capacity=10)
    er.inputs = torch.zeros((11, 1, 1, 1), dtype=torch.uint8)
    er.labels = torch.zeros(11, dtype=torch.long)
    er.logits = torch.zeros((11, 2))
    er.seen_count = torch.tensor(6)
    ctx: Any = dataclasses.make_dataclass("C", ["gen", "device"])(torch.Generator().manual_seed(0), torch.device("cpu"))
    for _ in range(50):
        idx = er._draw(ctx, 4)
        assert len(set(idx.tolist())) == 4 and int(idx.max()) < 6
    assert sorted(er._draw(ctx, 6).tolist()) == list(range(6))
    assert len(er._draw(ctx, 32)) == 10  # never more rows than the reservoir holds


def test_der_records_the_logits_of_the_training_pass_at_insertion() -> None:
    spy, der = Spy(), ReservoirDerPlugin(capacity=100, alpha=0.2, beta=0.5, passes=2)
    model = _model()
    data = _data(8, 1)
    _strategy(model, [spy, der]).train_experience(data, _empty(), [0, 1], [], task_index=0)
    # all 8 samples fit: each row holds the logits its own training step computed (before that
    # step's update, in train mode), over every output
    assert int(der.seen_count) == 8
    assert torch.equal(der.logits[:8], torch.cat(spy.logits))
    assert der.logits.shape[1] == 4
    assert torch.equal(der.inputs[:8], torch.cat([b.inputs for b in spy.batches]))


def test_der_two_passes_forward_each_draw_separately_and_match_the_definition() -> None:
    der = ReservoirDerPlugin(capacity=6, alpha=0.3, beta=0.5, passes=2)
    model = _model().train()
    seen: list[int] = []

    def forward_head(m: Any, x: torch.Tensor, experts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(len(x))
        return x, m(x)

    rng = np.random.default_rng(1)
    ctx: Any = dataclasses.make_dataclass(
        "C", ["gen", "device", "config", "cached", "prep", "model", "forward_head", "experts_for", "seen"]
    )(
        torch.Generator().manual_seed(5),
        torch.device("cpu"),
        TrainConfig(replay_batch_size=3, augment=False, loss="ce-all"),
        False,
        Preprocessing(16),
        model,
        forward_head,
        lambda labels: None,
        torch.arange(4),
    )
    der.inputs = torch.from_numpy(rng.integers(0, 255, (7, 16, 16, 3), dtype=np.uint8))
    der.labels = torch.tensor([0, 1, 2, 3, 0, 1, 0])
    der.logits = torch.from_numpy(rng.normal(size=(7, 4)).astype(np.float32))
    der.seen_count = torch.tensor(6)
    state = ctx.gen.get_state()
    loss = der._replay_loss(ctx)
    assert seen == [3, 3]  # two forward passes of 3, not one of 6 (BatchNorm sees each draw alone)
    ctx.gen.set_state(state)  # the same two draws again
    i1, i2 = der._draw(ctx, 3), der._draw(ctx, 3)
    with torch.no_grad():
        # same BatchNorm batches as inside the loss (train mode): recompute per draw
        o1 = model(to_input(der.inputs[i1], ctx.prep))
        o2 = model(to_input(der.inputs[i2], ctx.prep))
    expect = 0.3 * F.mse_loss(o1, der.logits[i1]) + 0.5 * F.cross_entropy(o2, der.labels[i2])
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-4)
    with pytest.raises(ValueError, match="passes"):
        ReservoirDerPlugin(4, passes=3)


def test_faithful_methods_train_over_all_outputs_with_mammoths_input_and_init() -> None:
    for name in ("er", "derpp"):
        m = METHODS[name]
        assert m.resolved(500)["loss"] == "ce-all" and m.input_norm == "cifar10" and m.init == "torch"
        assert m.plugins[0] in ("replay-reservoir", "der-reservoir")
    assert METHODS["derpp"].resolved(500)["der_passes"] == 2
    assert METHODS["derpp"].resolved(200)["der_alpha"] == 0.1 and METHODS["derpp"].resolved(500)["der_alpha"] == 0.2
    # the previous behaviour stays available under labelled names
    assert METHODS["derpp-balanced"].plugins == ("der",) and METHODS["derpp-balanced"].resolved(500)["loss"] == "ce"
    assert METHODS["er-balanced"].plugins == ("replay",) and METHODS["er-balanced"].init == "timm"
    assert METHODS["derpp-reservoir"].input_norm == "half"  # its published results keep their meaning
    spec = bench_run.RunSpec(PROTOCOLS["cifar10-5"], METHODS["derpp"], 500, 0, backbone="resnet10_cifar_slim")
    scenario = build_scenario(PROTOCOLS["cifar10-5"], 0, train_per_class=4, test_per_class=2, use_demo=True)
    model, prep, _, _ = bench_run._model(spec, scenario)
    assert prep.mean == CIFAR10_MEAN and prep.std == CIFAR10_STD
    # no zero_init_last: every block's last BatchNorm starts at gamma 1 (timm's init sets 0)
    assert _last_gammas(model) == {1.0}
    balanced = dataclasses.replace(spec, method=METHODS["derpp-balanced"])
    assert _last_gammas(bench_run._model(balanced, scenario)[0]) == {0.0}


def _last_gammas(model: torch.nn.Module) -> set[float]:
    """The distinct initial gammas of every residual block's last BatchNorm."""
    out: set[float] = set()
    for block in model.modules():
        if isinstance(block, BasicBlock):
            bn: Any = block.bn2
            out |= set(bn.weight.detach().unique().tolist())
    return out


def test_reset_to_torch_defaults_reinitialises_every_layer() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig("resnet10_cifar_slim", 16, head="linear"), np.eye(3, 8, dtype=np.float32))
    backbone: Any = model.backbone
    conv = backbone.conv1.weight
    with torch.no_grad():
        conv.fill_(5.0)
    assert reset_to_torch_defaults(model) > 10
    bound = 1 / np.sqrt(3 * 3 * 3)  # kaiming_uniform(a=sqrt(5)) on a 3x3 conv of 3 input channels
    assert float(conv.detach().abs().max()) <= bound + 1e-6


def test_black_padding_is_a_black_pixel_after_normalisation() -> None:
    prep = preprocessing(8, "cifar10")
    white = to_input(torch.full((64, 8, 8, 3), 255, dtype=torch.uint8), prep)
    fill = black_fill(prep, white.device)
    out = random_crop_flip(white, 4, torch.Generator().manual_seed(0), fill)
    raw = out * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    values = set(torch.round(raw * 255).unique().tolist())
    assert values == {0.0, 255.0}  # only black padding beside the white image
    grey = random_crop_flip(white, 4, torch.Generator().manual_seed(0))
    assert set(grey.unique().tolist()) >= {0.0}  # the product's padding: 0 in normalised units
    with pytest.raises(ValueError, match="input_norm"):
        preprocessing(8, "imagenet")


def test_faithful_er_and_derpp_run_in_the_harness_and_record_their_choices(tmp_path: Path) -> None:
    argv = ["--protocol", "cifar10-5", "--method", "er,derpp", "--buffer", "20", "--out", str(tmp_path), *TINY]
    assert bench_run.main(argv) == 0
    for name in ("er", "derpp"):
        rec: dict[str, Any] = json.loads((tmp_path / "smoke" / "cifar10-5" / f"{name}-b20-s0.json").read_text())
        hp = rec["hyperparameters"]
        assert hp["loss"] == "ce-all" and hp["init"] == "torch" and "black" in hp["augment"]
        assert hp["preprocessing"]["mean"] == list(CIFAR10_MEAN) and "reservoir" in hp["buffer_policy"]
        assert [t["buffer_size"] for t in rec["per_task"]] == [20, 20]
        assert rec["final_avg_acc"] is not None
