"""Multi-prototype concept tables: building them with the real MiniLM, the head's class score,
backwards compatibility with single-prototype tables, and a store that trains and exports one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FASHION_NAMES, SHARED_DATA, init_store, run_cli
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.concepts import ConceptTable, normalise_rows
from cvm_edge.model import DEFAULT_PROTOTYPE_TEMPERATURE, ConceptHead
from llm_embeddings.descriptions import BUNDLED, bundled


@pytest.fixture(scope="module")
def fashion_multi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10 Fashion-MNIST classes with the bundled descriptions, built through the CLI."""
    d = tmp_path_factory.mktemp("multi")
    (d / "classes.txt").write_text("\n".join(FASHION_NAMES) + "\n")
    args = ["--classes", str(d / "classes.txt"), "--descriptions", "fashion_mnist", "--out", str(d / "m.npz")]
    assert run_cli("-q", "embed", "build", *args) == 0
    return d / "m.npz"


# ----- tables ----------------------------------------------------------------------------------
def test_descriptions_add_rows_after_the_unchanged_name_row(fashion_table: Path, fashion_multi: Path) -> None:
    plain, multi = ConceptTable.load(fashion_table), ConceptTable.load(fashion_multi)
    desc = bundled("fashion_mnist")
    assert multi.names == plain.names and multi.is_multi_prototype
    assert multi.prototype_counts == tuple(1 + len(desc[n]) for n in multi.names)
    assert multi.prototypes == tuple(desc[n] for n in multi.names)
    # each class's first row is exactly its single-prototype row: one vs several is a clean comparison
    assert np.array_equal(multi.name_vectors().view(np.uint32), plain.as_float32().view(np.uint32))
    assert np.allclose(np.linalg.norm(multi.vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_descriptions_alone_name_the_classes(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("cat: [a small furry pet that purrs, a kitten playing]\n'No': [a red sign]\n")
    assert (
        run_cli("-q", "embed", "build", "--descriptions", str(tmp_path / "d.yaml"), "--out", str(tmp_path / "t.npz"))
        == 0
    )
    t = ConceptTable.load(tmp_path / "t.npz")
    assert t.names == ("cat", "No") and t.prototype_counts == (3, 2)
    v = t.vectors.astype(np.float32)
    assert v[1] @ v[0] > v[1] @ v[3]  # "a small furry pet that purrs" is nearer "cat" than "a red sign" is


def test_extend_appends_classes_with_their_prototypes(fashion_multi: Path, tmp_path: Path) -> None:
    (tmp_path / "new.txt").write_text("Sock\nScarf\n")
    # descriptions of an existing class are ignored: its prototypes never change once in the table
    (tmp_path / "d.yaml").write_text("sock: [a knitted sock for the foot]\nCoat: [a new coat description]\n")
    out = tmp_path / "ext.npz"
    args = [
        "--table",
        str(fashion_multi),
        "--classes",
        str(tmp_path / "new.txt"),
        "--descriptions",
        str(tmp_path / "d.yaml"),
    ]
    assert run_cli("-q", "embed", "extend", *args, "--out", str(out)) == 0
    old, new = ConceptTable.load(fashion_multi), ConceptTable.load(out)
    assert new.names == (*old.names, "Sock", "Scarf")
    assert new.prototype_counts == (*old.prototype_counts, 2, 1)
    assert new.prototypes[: len(old)] == old.prototypes
    assert np.array_equal(new.vectors[: len(old.vectors)].view(np.uint16), old.vectors.view(np.uint16))
    assert old.is_prefix_of(new)


def test_description_file_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.yaml").write_text("No: [a red sign]\n")  # YAML reads an unquoted No as false
    out = str(tmp_path / "t.npz")
    assert run_cli("-q", "embed", "build", "--descriptions", str(tmp_path / "d.yaml"), "--out", out) == 1
    assert "quote it" in capsys.readouterr().err
    assert run_cli("-q", "embed", "build", "--descriptions", "cifar-100", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert "bundled sets: cifar10, fashion_mnist, gtsrb, imagenette" in err and len(err.splitlines()) == 1
    assert not Path(out).exists()


def test_bundled_descriptions_cover_the_benchmark_classes() -> None:
    for name in BUNDLED:
        desc = bundled(name)
        if name == "fashion_mnist":
            classes = FASHION_NAMES
        elif (SHARED_DATA / name / "classes.json").is_file():
            classes = json.loads((SHARED_DATA / name / "classes.json").read_text())
        else:  # ../shared/data absent: only the class count can be checked
            classes = list(desc)
        assert list(desc) == classes, name
        assert all(3 <= len(v) <= 5 for v in desc.values()), name


def test_bundled_descriptions_point_at_their_own_class() -> None:
    """With the real MiniLM, the mean of a class's description rows is nearest to that class's
    name row for most classes (GTSRB's left/right and 3.5-ton pairs are the hard ones)."""
    from llm_embeddings.build import prototype_table
    from llm_embeddings.encoder import load_encoder

    enc = load_encoder()
    for name in BUNDLED:
        t = prototype_table(list(bundled(name)), encoder=enc)
        names = t.name_vectors()
        hits = [
            int(np.argmax(names @ t.vectors[t.class_rows(i)][1:].astype(np.float32).mean(0))) == i
            for i in range(len(t))
        ]
        assert np.mean(hits) >= 0.75, (name, np.mean(hits))


# ----- the head ----------------------------------------------------------------------------------
def _head(table: np.ndarray, t: float = DEFAULT_PROTOTYPE_TEMPERATURE) -> ConceptHead:
    torch.manual_seed(0)
    return ConceptHead(16, table, hidden=0, init_logit_scale=math.log(16.0), prototype_temperature=t).eval()


def test_single_prototype_head_gives_exactly_the_cosine_logits(fashion_table: Path) -> None:
    table = ConceptTable.load(fashion_table).as_float32()
    head = _head(table)
    assert not head.multi_prototype
    f = torch.randn(7, 16)
    with torch.no_grad():
        z = head.embed(f)
        expected = head.logit_scale.exp() * z @ torch.from_numpy(table).t()
        assert torch.equal(head(f), expected)


def test_multi_prototype_score_is_temperature_scaled_log_mean_exp() -> None:
    rng = np.random.default_rng(0)
    counts = (3, 1, 2)
    rows = normalise_rows(rng.normal(size=(sum(counts), 16))).astype(np.float16)
    protos = tuple(tuple(f"d{i}.{k}" for k in range(n - 1)) for i, n in enumerate(counts))
    table = ConceptTable(("a", "b", "c"), rows, "enc", "sha", (), "x", prototypes=protos)
    f = torch.randn(5, 16)
    for t in (0.05, 0.1, 1.0):
        head = _head(table.as_float32(), t)
        with torch.no_grad():
            z = head.embed(f).double().numpy()
            got = (head(f) / head.logit_scale.exp()).double().numpy()
        for i in range(3):
            s = z @ rows[table.class_rows(i)].astype(np.float64).T
            ref = t * np.log(np.mean(np.exp(s / t), axis=1))  # T*logsumexp(s/T) - T*log(P_c)
            assert np.allclose(got[:, i], ref, atol=1e-5), (t, i)
        assert np.allclose(got[:, 1], z @ rows[3].astype(np.float64), atol=1e-6)  # one prototype: its cosine
    # temperature limits: near the best prototype for small T, near the mean for large T
    s0 = z @ rows[0:3].astype(np.float64).T
    with torch.no_grad():
        small = (_head(table.as_float32(), 1e-3)(f) / math.exp(math.log(16.0))).double().numpy()[:, 0]
        large = (_head(table.as_float32(), 1e3)(f) / math.exp(math.log(16.0))).double().numpy()[:, 0]
    assert np.allclose(small, s0.max(1), atol=1e-2) and np.allclose(large, s0.mean(1), atol=1e-3)


def test_score_does_not_depend_on_how_many_prototypes_a_class_has() -> None:
    rng = np.random.default_rng(1)
    base = normalise_rows(rng.normal(size=(2, 16)))
    once = base[:, None, :]  # [2, 1, 16] as a (degenerate) multi-prototype table
    thrice = np.stack([base[0], base[0], base[0], base[1], np.zeros(16), np.zeros(16)]).reshape(2, 3, 16)
    f = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(_head(once)(f), _head(thrice)(f), atol=1e-5)
        assert torch.allclose(_head(base)(f), _head(thrice)(f), atol=1e-5)


def test_multi_prototype_head_trains(fashion_multi: Path) -> None:
    head = _head(ConceptTable.load(fashion_multi).as_float32()).train()
    loss = torch.nn.functional.cross_entropy(head(torch.randn(8, 16)), torch.arange(8) % 10)
    loss.backward()
    assert head.mapper.net.weight.grad is not None and torch.isfinite(head.mapper.net.weight.grad).all()
    assert float(head.mapper.net.weight.grad.abs().sum()) > 0


def test_init_prototype_temperature_default_matches_the_model() -> None:
    from cvm_edge import vocabulary
    from cvm_edge.cli import build_parser
    from cvm_edge.cli.learn import _settings

    # A flag left out stays UNSET until the settings resolve it (flag, else --config, else default).
    args = build_parser().parse_args(["init", "--workdir", "w", "--concepts", "t.npz"])
    assert _settings(args, "init", vocabulary.INIT)["prototype_temperature"] == DEFAULT_PROTOTYPE_TEMPERATURE


# ----- a store with a multi-prototype table --------------------------------------------------------
def test_multi_prototype_store_trains_exports_and_predicts(
    fashion_multi: Path, class_folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wd = tmp_path / "w"
    init_store(wd, fashion_multi, "--buffer-size", "40", "--prototype-temperature", "0.2")
    data = class_folders([5, 7], per_class=40)
    assert run_cli("-q", "update", "--workdir", str(wd), "--data", str(data), "--epochs", "1", "--no-progress") == 0
    ck = CheckpointStore(wd).load()
    assert ck.table.fingerprint == ConceptTable.load(fashion_multi).fingerprint
    assert ck.model_config.prototype_temperature == 0.2
    manifest = json.loads((wd / "bundles" / "v000002" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["top1_agreement"] == 1.0
    assert manifest["model"]["prototype_temperature"] == 0.2 and manifest["classes"] == ["Sandal", "Sneaker"]
    assert ConceptTable.load(wd / "bundles" / "v000002" / "concepts.npz").prototypes == ck.table.prototypes
    # int8 calibration measures every tensor of the graph: the head must keep them all finite
    assert run_cli("-q", "export", "--workdir", str(wd), "--precision", "int8") == 0
    int8 = json.loads((wd / "bundles" / "v000002-int8" / "manifest.json").read_text())
    assert int8["parity"]["passed"]
    capsys.readouterr()
    img = next((data / "sandal").iterdir())
    assert run_cli("predict", "--workdir", str(wd), str(img), "--json") == 0
    labels = [p["label"] for p in json.loads(capsys.readouterr().out)["results"][0]["predictions"]]
    assert sorted(labels) == ["Sandal", "Sneaker"]
