"""Task similarity from the concept table (cvm_edge.lab.similarity): report, risk ranking, scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import init_store, run_cli
from cvm_edge.concepts import ConceptTable
from cvm_edge.lab.similarity import MAX_FACTOR, MIN_FACTOR, class_vectors, scaling_factor, task_similarity
from cvm_edge.model import ConceptHead, LinearHead
from cvm_edge.plugins import DistillPlugin, EwcPlugin, PluginOptions, make_plugins


def _vectors(table_path: Path) -> tuple[ConceptTable, np.ndarray]:
    t = ConceptTable.load(table_path)
    return t, class_vectors(t.as_float32())


def test_coat_is_more_at_risk_than_sandal_when_pullover_is_new(fashion_table: Path) -> None:
    t, v = _vectors(fashion_table)
    pullover = t.names.index("Pullover")
    old = [i for i in range(len(t)) if i != pullover]
    sim = task_similarity(v, [pullover], old)
    order = [t.names[k.row] for k in sim.risks]
    assert sorted(order) == sorted(t.names[i] for i in old)
    assert order.index("Coat") < order.index("Sandal")
    risk = {t.names[k.row]: k.cosine for k in sim.risks}
    assert risk["Coat"] > risk["Sandal"] and all(t.names[k.nearest_new] == "Pullover" for k in sim.risks)
    assert [k.cosine for k in sim.risks] == sorted((k.cosine for k in sim.risks), reverse=True)


def test_figures_follow_the_documented_formula(fashion_table: Path) -> None:
    t, v = _vectors(fashion_table)
    new, old = (
        [t.names.index("Coat"), t.names.index("Shirt")],
        [t.names.index("Pullover"), t.names.index("Bag"), t.names.index("Trouser")],
    )
    sim = task_similarity(v, new, old)
    cos = t.as_float32().astype(np.float64)
    cos = cos / np.linalg.norm(cos, axis=1, keepdims=True)
    pairs = cos @ cos.T
    mean_old_new = pairs[np.ix_(old, new)].mean()
    reference = pairs[~np.eye(len(t), dtype=bool)].mean()
    assert sim.similarity == pytest.approx(mean_old_new, abs=1e-6)
    assert sim.reference == pytest.approx(reference, abs=1e-6)
    for p in (1.0, 2.0, -1.0):
        assert sim.factor(p) == pytest.approx(np.clip((mean_old_new / reference) ** p, MIN_FACTOR, MAX_FACTOR))
    assert sim.factor(0.0) == 1.0
    d = sim.to_dict(t.names, 1.0)
    assert d["at_risk"][0]["class"] == t.names[sim.risks[0].row] and len(d["old_class_risk"]) == 3
    assert task_similarity(v, new, []).factor(1.0) == 1.0  # first update: nothing old to protect


def test_closer_update_gets_a_larger_factor(fashion_table: Path) -> None:
    """Tops are old; new tops (Coat, Shirt) scale protection up, new Bag and Sandal scale it down."""
    t, v = _vectors(fashion_table)
    old = [t.names.index("Pullover"), t.names.index("T-shirt/top")]
    close = task_similarity(v, [t.names.index("Coat"), t.names.index("Shirt")], old).factor(1.0)
    far = task_similarity(v, [t.names.index("Bag"), t.names.index("Sandal")], old).factor(1.0)
    assert close > 1.0 > far


def test_scaling_factor_is_clipped() -> None:
    assert scaling_factor(0.9, 0.1, 1.0) == MAX_FACTOR
    assert scaling_factor(-0.2, 0.3, 1.0) == MIN_FACTOR
    assert scaling_factor(0.3, 0.0, 1.0) == 1.0 and scaling_factor(None, 0.3, 1.0) == 1.0


def test_class_vectors_of_a_padded_table_are_normalised_means() -> None:
    rows = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 0.0]]], np.float32)
    v = class_vectors(rows)
    assert np.allclose(v, [[math.sqrt(0.5), math.sqrt(0.5)], [0.0, 1.0]])


# ----- plugins ----------------------------------------------------------------------------------
def _ctx(table: np.ndarray, new: list[int], old: list[int], head: torch.nn.Module | None = None) -> SimpleNamespace:
    model = torch.nn.Module()  # a model with only a head (distillation copies it as its teacher)
    model.head = head if head is not None else ConceptHead(8, table, hidden=0, init_logit_scale=math.log(16.0))
    return SimpleNamespace(
        model=model,
        current_classes=torch.tensor(new),
        old_classes=torch.tensor(old),
        device=torch.device("cpu"),
    )


def test_distill_scaling_multiplies_the_weight_and_the_loss(fashion_table: Path) -> None:
    t, v = _vectors(fashion_table)
    new, old = (
        [t.names.index("Coat"), t.names.index("Shirt")],
        [t.names.index("Pullover"), t.names.index("T-shirt/top")],
    )
    expected = task_similarity(v, new, old).factor(1.0)
    assert expected != pytest.approx(1.0, abs=0.05)  # the test would prove nothing otherwise
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 384), dim=-1)
    z_t = torch.nn.functional.normalize(torch.randn(6, 384), dim=-1)
    out = SimpleNamespace(x=torch.zeros(6, 1), embeddings=z)
    losses = {}
    for power in (0.0, 1.0):
        plugin, _balance = make_plugins(["distill"], PluginOptions(distill_weight=0.5, similarity_scaling=power))
        assert isinstance(plugin, DistillPlugin)
        ctx = _ctx(t.as_float32(), new, old)
        ctx.forward_head = lambda model, x: (z_t, None)
        plugin.before_experience(ctx)  # type: ignore[arg-type]
        losses[power] = float(plugin.loss(ctx, None, out))  # type: ignore[arg-type]
        assert plugin.effective_weight == pytest.approx(0.5 * (expected if power else 1.0))
    assert losses[1.0] / losses[0.0] == pytest.approx(expected, rel=1e-5)


def test_ewc_scaling_multiplies_lambda_and_the_penalty(fashion_table: Path) -> None:
    t, v = _vectors(fashion_table)
    new, old = (
        [t.names.index("Bag"), t.names.index("Sandal")],
        [t.names.index("Pullover"), t.names.index("T-shirt/top")],
    )
    expected = task_similarity(v, new, old).factor(2.0)
    penalties = {}
    for power in (0.0, 2.0):
        torch.manual_seed(0)
        head = ConceptHead(8, t.as_float32(), hidden=0, init_logit_scale=math.log(16.0))
        plugin = EwcPlugin(lam=10.0, similarity_scaling=power)
        ctx = _ctx(t.as_float32(), new, old, head)
        params = dict(ctx.model.named_parameters())
        plugin.fisher = {k: torch.ones_like(p) for k, p in params.items()}
        plugin.star = {k: p.detach() + 0.1 for k, p in params.items()}
        plugin.before_experience(ctx)  # type: ignore[arg-type]
        penalties[power] = float(plugin.loss(ctx, None, None).detach())  # type: ignore[arg-type]
        assert plugin.effective_lambda == pytest.approx(10.0 * (expected if power else 1.0))
    assert penalties[2.0] / penalties[0.0] == pytest.approx(expected, rel=1e-5) and expected < 1.0


def test_linear_head_has_no_table_and_is_not_scaled() -> None:
    plugin = DistillPlugin(similarity_scaling=1.0)
    plugin.before_experience(_ctx(np.zeros((3, 8)), [2], [0, 1], head=LinearHead(8, 3)))  # type: ignore[arg-type]
    assert plugin.factor == 1.0


# ----- cvm update -------------------------------------------------------------------------------
def test_update_reports_similarity_in_history_and_status(
    fashion_table: Path, class_folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "20")
    common = ["--epochs", "1", "--no-progress", "--no-export", "--balance-epochs", "0", "--force"]
    first = class_folders([4, 5], per_class=20, name="a")  # Coat, Sandal
    assert run_cli("-q", "update", "--workdir", str(wd), "--data", str(first), *common) == 0
    capsys.readouterr()
    second = class_folders([2], per_class=20, name="b")  # Pullover
    lab = tmp_path / "lab.toml"
    lab.write_text("similarity_scaling = 1.0\n")  # a lab setting: config file only
    assert (
        run_cli("update", "--workdir", str(wd), "--data", str(second), "--experimental", "--config", str(lab), *common)
        == 0
    )
    printed = capsys.readouterr().out
    assert "old classes most at risk: Coat" in printed
    assert run_cli("status", "--workdir", str(wd), "--json") == 0
    history = json.loads(capsys.readouterr().out)["history"]
    assert history[0]["similarity"]["similarity"] is None and history[0]["similarity"]["factor"] == 1.0
    sim = history[1]["similarity"]
    assert [r["class"] for r in sim["at_risk"]] == ["Coat", "Sandal"]
    assert sim["old_class_risk"]["Coat"] > sim["old_class_risk"]["Sandal"]
    assert all(r["nearest_new"] == "Pullover" for r in sim["at_risk"])
    _, v = _vectors(fashion_table)
    expected = task_similarity(v, [2], [4, 5])
    assert sim["scaling_power"] == 1.0 and sim["factor"] == pytest.approx(expected.factor(1.0), abs=1e-4)
