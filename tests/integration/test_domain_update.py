"""Domain-incremental updates: `cvm update` with new images of classes the model already knows.

Real images from the embedded Fashion-MNIST sample; the "new domain" is a low-light version of
other training images of the same classes (gamma 2.2 and half brightness, written as PNG files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FASHION_NAMES, init_store, run_cli, update_store
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.demo import write_class_folders
from cvm_edge.evaluate import accuracy_matrix


def _folder(sample: dict[str, np.ndarray], root: Path, classes: list[int], start: int, n: int, dark: bool) -> Path:
    """Training images start..start+n of each class, optionally darkened (a low-light camera)."""
    images, labels = sample["train_images"], sample["train_labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[start : start + n] for c in classes])
    pix = images[keep]
    if dark:
        pix = (255.0 * 0.5 * (pix / 255.0) ** 2.2).round().astype(np.uint8)
    return write_class_folders(root, pix, labels[keep], FASHION_NAMES, classes)


@pytest.fixture()
def store(fashion_table: Path, sample: dict[str, np.ndarray], tmp_path: Path) -> Path:
    """A store that learned T-shirt/top (0) and Trouser (1) from 40 clean images each."""
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "40")
    assert update_store(wd, _folder(sample, tmp_path / "clean", [0, 1], 0, 40, dark=False), "--epochs", "2") == 0
    return wd


def test_update_with_only_known_classes_is_domain_incremental(
    store: Path, sample: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dark = _folder(sample, tmp_path / "dark", [0, 1], 40, 40, dark=True)
    capsys.readouterr()
    assert update_store(store, dark, "--epochs", "1", "--force") == 0
    out = capsys.readouterr().out
    assert "update 2 (domain-incremental)" in out and "known classes with new images (T-shirt/top, Trouser)" in out
    ck = CheckpointStore(store).load()
    e = ck.history[-1]
    assert e["kind"] == "domain-incremental"
    assert e["new_classes"] == [] and e["new_class_names"] == [] and e["new_accuracy"] is None
    assert e["revisited_classes"] == [0, 1] and e["trained_classes"] == [0, 1]
    rev = e["revisited"]
    assert set(rev) == {"new_data_before", "new_data_after", "earlier_data_before", "earlier_data_after"}
    assert all(0.0 <= v <= 1.0 for v in rev.values())
    # the gate's old-class figure is the earlier (clean) held-out images' figure
    assert e["old_accuracy"] == pytest.approx(rev["earlier_data_after"])
    assert e["similarity"]["at_risk"] == []  # no new rows: the table puts nothing at risk
    assert ck.seen == (0, 1)
    # the held-out set now holds both domains; the buffer keeps both (tasks 1 and 2, 10 each per class)
    assert len(ck.val) == 2 * len(CheckpointStore(store).load(2).val)
    assert ck.buffer.task_counts(0) == {1: 10, 2: 10} and ck.buffer.task_counts(1) == {1: 10, 2: 10}
    # the status matrix has a column for the domain update (its classes are the revisited ones)
    assert [r is not None for r in accuracy_matrix(ck.history)[1]] == [True, True]
    assert run_cli("status", "--workdir", str(store)) == 0
    assert "update 2 (domain-incremental): new images of known T-shirt/top, Trouser" in capsys.readouterr().out
    assert run_cli("status", "--workdir", str(store), "--json") == 0
    assert json.loads(capsys.readouterr().out)["history"][-1]["kind"] == "domain-incremental"


def test_mixed_update_names_new_and_revisited_classes(
    store: Path, sample: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed = _folder(sample, tmp_path / "mixed", [1, 2], 40, 40, dark=True)
    capsys.readouterr()
    assert update_store(store, mixed, "--epochs", "1", "--force") == 0
    out = capsys.readouterr().out
    assert "update 2 (mixed)" in out
    assert "new classes (Pullover)" in out and "known classes with new images (Trouser)" in out
    e = CheckpointStore(store).load().history[-1]
    assert (e["kind"], e["new_classes"], e["revisited_classes"], e["trained_classes"]) == ("mixed", [2], [1], [1, 2])
    assert e["new_accuracy"] is not None and e["revisited"]["new_data_after"] is not None
    # T-shirt/top (not in this update) and Trouser (revisited) are both old classes at risk from Pullover
    assert {r["class"] for r in e["similarity"]["at_risk"]} == {"T-shirt/top", "Trouser"}
    assert CheckpointStore(store).load().seen == (0, 1, 2)


def test_gate_protects_the_earlier_domain_of_revisited_classes(
    store: Path, sample: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An update of only known classes that teaches the opposite (a broken pipeline swapped the
    labels) must be refused: every class is revisited, so only the earlier held-out images show it."""
    images, labels = sample["train_images"], sample["train_labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[40:100] for c in (0, 1)])
    swapped = write_class_folders(tmp_path / "swapped", images[keep], 1 - labels[keep], FASHION_NAMES, [0, 1])
    before = CheckpointStore(store).load().history[-1]["per_class_accuracy"]
    assert min(before.values()) >= 0.6, before  # the clean classes were learned: there is something to lose
    capsys.readouterr()
    code = update_store(store, swapped, "--epochs", "3", "--plugins", "none", "--max-forgetting", "10")
    assert code == 1
    err = capsys.readouterr().err
    assert "old-class accuracy on earlier held-out images would fall" in err and "nothing was published" in err
    assert "Fell most:" in err
    assert CheckpointStore(store).versions() == [1, 2]
    # forced, it publishes and records that it was forced, with the revisited classes' fall
    assert update_store(store, swapped, "--epochs", "3", "--plugins", "none", "--force") == 0
    e = CheckpointStore(store).load().history[-1]
    assert e["forced"] is True and e["kind"] == "domain-incremental"
    assert e["revisited"]["earlier_data_after"] < e["revisited"]["earlier_data_before"] - 0.1


def test_ace_gives_revisited_classes_the_full_softmax() -> None:
    """Incoming images of a known class compete among all seen classes; those of a new class only
    among this experience's classes (a one-class experience of a new class gives zero loss)."""
    import types

    import torch
    import torch.nn.functional as F

    from cvm_edge.strategy import Batch, classification_loss

    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0], [0.0, 1.5, 3.0, 0.2]])
    seen = torch.arange(4)
    batch = Batch(torch.zeros(2), torch.tensor([1, 3]), torch.zeros(2, dtype=torch.bool))

    def ctx(current: list[int], revisited: list[int]) -> types.SimpleNamespace:
        r = torch.tensor(revisited, dtype=torch.long)
        # seen_revisited is the Context's per-experience cache of isin(seen, revisited)
        return types.SimpleNamespace(
            seen=seen, current_classes=torch.tensor(current), revisited_classes=r, seen_revisited=torch.isin(seen, r)
        )

    def loss(current: list[int], revisited: list[int]) -> float:
        return float(classification_loss(logits, batch, ctx(current, revisited), "ace"))  # type: ignore[arg-type]

    full = F.cross_entropy(logits, torch.tensor([1, 3]), reduction="none")
    only_current = F.cross_entropy(logits[:, [1, 3]], torch.tensor([0, 1]), reduction="none")
    assert loss([1, 3], [1, 3]) == pytest.approx(float(full.mean()))  # known classes only: plain CE
    assert loss([1, 3], []) == pytest.approx(float(only_current.mean()))  # new classes only: ACE as before
    assert loss([1, 3], [1]) == pytest.approx(float((full[0] + only_current[1]) / 2))  # mixed
    one = Batch(torch.zeros(1), torch.tensor([1]), torch.zeros(1, dtype=torch.bool))
    assert float(classification_loss(logits[:1], one, ctx([1], [1]), "ace")) > 0.5  # type: ignore[arg-type]
    assert float(classification_loss(logits[:1], one, ctx([1], []), "ace")) == pytest.approx(0.0)  # type: ignore[arg-type]


def test_domain_update_on_a_frozen_backbone_scores_from_cached_features(
    fashion_table: Path, sample: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The frozen-backbone path (features computed once, head rerun) gives the same bookkeeping."""
    wd = tmp_path / "frozen"
    init_store(wd, fashion_table, "--buffer-size", "40", "--train-backbone", "none")
    assert update_store(wd, _folder(sample, tmp_path / "clean", [0, 1, 2], 0, 30, dark=False), "--epochs", "2") == 0
    assert (
        update_store(wd, _folder(sample, tmp_path / "dark", [0, 1, 2], 30, 30, dark=True), "--epochs", "1", "--force")
        == 0
    )
    e = CheckpointStore(wd).load().history[-1]
    assert e["kind"] == "domain-incremental" and e["revisited_classes"] == [0, 1, 2]
    assert e["old_accuracy"] == pytest.approx(e["revisited"]["earlier_data_after"])
    assert e["old_accuracy_before"] == pytest.approx(e["revisited"]["earlier_data_before"])
    # the first update's figures on the clean held-out images are what the second one starts from
    first = CheckpointStore(wd).load(2).history[-1]["per_class_accuracy"]
    assert e["old_accuracy_before"] == pytest.approx(np.mean([first[k] for k in ("0", "1", "2")]))


def test_store_written_before_buffer_tags_takes_a_domain_update(
    store: Path, sample: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A version saved before buffer entries carried their update (no ``tasks`` member): its
    entries count as one earlier experience and keep half of each revisited class's share."""
    path = store / "checkpoints" / "v000002" / "buffer.npz"
    with np.load(path) as z:
        members = {k: z[k] for k in z.files if k != "tasks"}
    path.chmod(0o644)
    with open(path, "wb") as fh:
        np.savez(fh, **members)
    meta_path = path.parent / "meta.json"  # such a version also predates the files' sha256 in its meta.json
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.chmod(0o644)
    meta_path.write_text(json.dumps(meta))
    assert (
        update_store(store, _folder(sample, tmp_path / "dark", [0, 1], 40, 40, dark=True), "--epochs", "1", "--force")
        == 0
    )
    buf = CheckpointStore(store).load().buffer
    assert buf.task_counts(0) == {-1: 10, 2: 10} and buf.task_counts(1) == {-1: 10, 2: 10}


def test_local_loss_leaves_the_rows_of_classes_the_store_holds_no_image_of_untouched() -> None:
    """A fleet device's loss ("local"): incoming and replayed images compete among the classes the
    store holds images of (this experience's and its buffer's), so rows it never sees get no gradient."""
    import types

    import torch
    import torch.nn.functional as F

    from cvm_edge.strategy import Batch, classification_loss

    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.3], [0.0, 1.5, 3.0, 0.2, -0.4]], requires_grad=True)
    seen = torch.arange(5)
    # one incoming image of a revisited class (1) and one replayed image (3)
    batch = Batch(torch.zeros(2), torch.tensor([1, 3]), torch.tensor([False, True]))
    ctx = types.SimpleNamespace(
        seen=seen,
        current_classes=torch.tensor([1]),
        seen_revisited=torch.isin(seen, torch.tensor([1])),
        local_classes=torch.tensor([1, 3]),
    )
    loss = classification_loss(logits, batch, ctx, "local")  # type: ignore[arg-type]
    want = F.cross_entropy(logits.detach()[:, [1, 3]], torch.tensor([0, 1]))
    assert float(loss.detach()) == pytest.approx(float(want))
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[:, [0, 2, 4]] == 0) and torch.all(logits.grad[:, [1, 3]] != 0)
