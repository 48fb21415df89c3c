"""The ``align`` plugin (cvm_edge.lab.align): 1 - cos(embedding, own concept row) on incoming
images only, for single- and multi-prototype tables; refused on a linear head; run end to end by
the harness's ``cvm-er-distill-align`` on the embedded Fashion-MNIST sample (real MiniLM table)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import run as bench_run
from conftest import init_store, update_store
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.model import ConceptHead, LinearHead
from cvm_edge.plugins import AlignPlugin, make_plugins, parse_plugin_list
from cvm_edge.strategy import Batch, Output


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    v = rng.normal(size=shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _loss(head: torch.nn.Module, z: torch.Tensor, labels: list[int], from_buffer: list[bool], weight: float = 1.0):
    batch = Batch(
        inputs=torch.zeros(len(labels)),
        labels=torch.tensor(labels),
        from_buffer=torch.tensor(from_buffer),
    )
    plugin = AlignPlugin(weight)
    ctx = SimpleNamespace(model=SimpleNamespace(head=head))
    plugin.before_experience(ctx)  # type: ignore[arg-type]
    return plugin.loss(ctx, batch, Output(x=z, embeddings=z, logits=head.logits_from_embedding(z)))  # type: ignore[arg-type]


def test_loss_is_one_minus_the_cosine_to_the_own_row_averaged_over_incoming_images() -> None:
    rng = np.random.default_rng(0)
    table = _unit(rng, 5, 8)
    head = ConceptHead(feat_dim=4, table=table, hidden=0, init_logit_scale=2.0)
    z = torch.from_numpy(_unit(rng, 4, 8))
    labels, replayed = [3, 1, 0, 3], [False, True, False, False]
    expected = np.mean([1.0 - float(table[y] @ z[i].numpy()) for i, y in enumerate(labels) if not replayed[i]])
    loss = _loss(head, z, labels, replayed, weight=0.5)
    assert loss is not None
    assert float(loss) == pytest.approx(0.5 * expected, abs=1e-6)
    # The replayed sample takes no part: moving its embedding changes nothing.
    z2 = z.clone()
    z2[1] = -z2[1]
    assert float(_loss(head, z2, labels, replayed, weight=0.5)) == pytest.approx(float(loss), abs=1e-7)
    # An embedding on its own row costs nothing.
    on_row = torch.from_numpy(table[[3, 1, 0, 3]])
    assert float(_loss(head, on_row, labels, replayed)) == pytest.approx(0.0, abs=1e-6)
    # An all-replayed batch gives 0, not a division by zero; weight 0 turns the term off.
    assert float(_loss(head, z, labels, [True] * 4)) == 0.0
    assert _loss(head, z, labels, replayed, weight=0.0) is None


def test_loss_gradient_moves_incoming_embeddings_towards_their_rows() -> None:
    rng = np.random.default_rng(1)
    table = _unit(rng, 3, 6)
    head = ConceptHead(feat_dim=4, table=table, hidden=0, init_logit_scale=2.0)
    raw = torch.from_numpy(rng.normal(size=(3, 6)).astype(np.float32)).requires_grad_(True)
    labels = [0, 2, 1]
    loss = _loss(head, F.normalize(raw, dim=-1), labels, [False, False, True])
    assert loss is not None
    loss.backward()
    assert raw.grad is not None
    stepped = F.normalize(raw.detach() - 0.1 * raw.grad, dim=-1)
    before = F.normalize(raw.detach(), dim=-1)
    t = torch.from_numpy(table)
    for i in (0, 1):  # incoming: closer to the own row
        assert float(stepped[i] @ t[labels[i]]) > float(before[i] @ t[labels[i]])
    assert torch.equal(raw.grad[2], torch.zeros(6))  # replayed: untouched


def test_multi_prototype_tables_use_the_class_score() -> None:
    rng = np.random.default_rng(2)
    table = _unit(rng, 4, 3, 8)
    table[1, 2] = 0.0  # class 1 has two prototypes (a padding row)
    head = ConceptHead(feat_dim=4, table=table, hidden=0, init_logit_scale=2.0)
    z = torch.from_numpy(_unit(rng, 2, 8))
    cos = head.cosines(z)
    # By hand: T * log(mean over the class's real prototypes of exp(cos / T)), T the head's temperature.
    t = head.prototype_temperature
    for i, y in enumerate([1, 2]):
        rows = [r for r in table[y] if np.any(r != 0)]
        sims = np.array([float(r @ z[i].numpy()) for r in rows])
        assert float(cos[i, y]) == pytest.approx(t * np.log(np.mean(np.exp(sims / t))), abs=1e-5)
    torch.testing.assert_close(head.logits_from_embedding(z), head.logit_scale.exp() * cos)
    loss = _loss(head, z, [1, 2], [False, False])
    assert float(loss) == pytest.approx(float((1 - cos[0, 1] + 1 - cos[1, 2]) / 2), abs=1e-6)


def test_align_is_a_plugin_name_and_refuses_a_linear_head() -> None:
    assert parse_plugin_list("replay,distill,align") == ["replay", "distill", "align"]
    plugin, _balance = make_plugins(["align"])
    assert isinstance(plugin, AlignPlugin) and plugin.weight == 1.0
    with pytest.raises(ValueError, match="concept head"):
        _loss(LinearHead(feat_dim=8, num_classes=5), torch.zeros(2, 8), [0, 1], [False, False])
    with pytest.raises(ValueError, match=">= 0"):
        AlignPlugin(-1.0)


@pytest.fixture
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


@pytest.mark.usefixtures("_cache")
def test_harness_runs_cvm_er_distill_align_and_records_it(tmp_path: Path) -> None:
    tiny = ["--smoke", "--demo", "--train-per-class", "30", "--test-per-class", "10", "--threads", "2"]
    argv = ["--protocol", "cifar10-5", "--method", "cvm-er-distill-align", "--buffer", "20", "--out", str(tmp_path)]
    assert bench_run.main([*argv, *tiny]) == 0
    rec = json.loads((tmp_path / "smoke" / "cifar10-5" / "cvm-er-distill-align-b20-s0.json").read_text())
    hp = rec["hyperparameters"]
    assert hp["plugins"] == ["replay", "distill", "align"] and hp["align_weight"] == 1.0 and hp["loss"] == "ace"
    assert (
        len(rec["acc_matrix"]) == 2 and np.isfinite(rec["final_avg_acc"]) and rec["hyperparameters"]["overrides"] == {}
    )
    # --hp replaces the weight for a sweep; the file takes the tag, the override is recorded.
    assert bench_run.main([*argv, *tiny, "--hp", "align_weight=0.25", "--tag=-w025"]) == 0
    rec = json.loads((tmp_path / "smoke" / "cifar10-5" / "cvm-er-distill-align-w025-b20-s0.json").read_text())
    assert rec["hyperparameters"]["align_weight"] == 0.25 and rec["hyperparameters"]["overrides"] == {
        "align_weight": 0.25
    }


def test_hp_overrides_are_checked() -> None:
    assert bench_run.parse_overrides(["align_weight=0.3", "optimizer=sgd", "lr=1e-4"]) == (
        ("align_weight", 0.3),
        ("optimizer", "sgd"),
        ("lr", 1e-4),
    )
    with pytest.raises(SystemExit, match="unknown key 'align_wieght'"):
        bench_run.parse_overrides(["align_wieght=0.3"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench_run.parse_overrides(["align_weight"])
    with pytest.raises(SystemExit, match="--hp needs --tag"):
        bench_run.main(["--protocol", "cifar10-5", "--method", "cvm-er", "--smoke", "--hp", "lr=0.01"])


def test_loss_is_float32_under_bf16_autocast() -> None:
    rng = np.random.default_rng(3)
    table = _unit(rng, 6, 16)
    head = ConceptHead(feat_dim=4, table=table, hidden=0, init_logit_scale=2.0)
    # Embeddings close to their rows: 1 - cos is small, where bf16's 8-bit mantissa would show.
    z = F.normalize(torch.from_numpy(table[[0, 4, 5]] + 0.05 * rng.normal(size=(3, 16)).astype(np.float32)), dim=-1)
    exact = _loss(head, z, [0, 4, 5], [False] * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _loss(head, z, [0, 4, 5], [False] * 3)
    assert auto is not None and exact is not None and auto.dtype == torch.float32
    assert float(auto) == pytest.approx(float(exact), rel=1e-5)


def test_cvm_update_with_align_and_its_usage_errors(
    fashion_table: Path, class_folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = class_folders([0, 1], per_class=20)
    wd = tmp_path / "concepts"
    init_store(wd, fashion_table, "--buffer-size", "20")
    lab = ("--experimental", "--plugins", "replay,distill,align", "--config")
    for bad in ("-1", "nan", "inf"):  # the align weight is a lab setting: a config file's
        (tmp_path / "bad.toml").write_text(f"align_weight = {bad}\n")
        assert update_store(wd, data, *lab, str(tmp_path / "bad.toml")) == 2
        assert "must be a finite number >= 0" in capsys.readouterr().err
    (tmp_path / "lab.toml").write_text("align_weight = 0.5\n")
    assert update_store(wd, data, "--epochs", "1", *lab, str(tmp_path / "lab.toml")) == 0
    assert CheckpointStore(wd).load().plugins == ("replay", "distill", "align")
    linear = tmp_path / "linear"
    init_store(linear, fashion_table, "--buffer-size", "20", "--head", "linear")
    capsys.readouterr()
    assert update_store(linear, data, "--experimental", "--epochs", "1", "--plugins", "replay,align") == 2
    assert "the align plugin needs the concept head; this store's head is linear" in capsys.readouterr().err
    assert CheckpointStore(linear).versions() == [1]
