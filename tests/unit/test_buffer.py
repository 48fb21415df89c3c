from __future__ import annotations

import numpy as np

from cvm_edge.buffer import ReplayBuffer, _quotas
from cvm_edge.data import ImageSet


def _set(labels: list[int], size: int = 4) -> ImageSet:
    lab = np.asarray(labels, np.int64)
    pix = np.stack([np.full((size, size, 3), i % 256, np.uint8) for i in range(len(lab))])
    return ImageSet(pix, lab)


def test_quotas_are_balanced_and_redistribute() -> None:
    assert _quotas({0: 100, 1: 100, 2: 100}, 10) == {0: 4, 1: 3, 2: 3}
    assert _quotas({0: 2, 1: 100}, 10) == {0: 2, 1: 8}
    assert _quotas({0: 1, 1: 1}, 10) == {0: 1, 1: 1}
    assert _quotas({0: 5, 1: 5, 2: 5}, 2) == {0: 1, 1: 1, 2: 0}


def test_update_keeps_class_balance_and_old_logits() -> None:
    buf = ReplayBuffer.empty(capacity=12, image_size=4)
    b1 = buf.updated(_set([0] * 50 + [1] * 50), np.ones((100, 3), np.float16), seed=0, task=0)
    assert b1.class_counts() == {0: 6, 1: 6}
    b2 = b1.updated(_set([2] * 50 + [3] * 50), np.full((100, 5), 2, np.float16), seed=1, task=1)
    assert b2.class_counts() == {0: 3, 1: 3, 2: 3, 3: 3}
    old = np.isin(b2.labels, [0, 1])
    assert b2.logits.shape == (12, 5)
    assert np.all(b2.logits[old, :3] == 1) and np.all(b2.logits[old, 3:] == 0)  # padded, not recomputed
    assert np.all(b2.logits[~old] == 2)
    # old entries are a subset of what was there
    old_pixels = {p.tobytes() for p in b1.pixels}
    assert all(p.tobytes() in old_pixels for p in b2.pixels[old])


def test_byte_budget_bounds_the_buffer() -> None:
    buf = ReplayBuffer.empty(capacity=1000, image_size=4, max_bytes=10 * (48 + 8 + 4 + 2))
    b = buf.updated(_set([0] * 50 + [1] * 50), None, seed=0, task=0)
    assert len(b) == 10 and b.nbytes <= buf.max_bytes


def test_seeded_and_roundtrip(tmp_path) -> None:
    data = _set([0] * 30 + [1] * 30)
    a = ReplayBuffer.empty(10, 4).updated(data, None, seed=3, task=0)
    b = ReplayBuffer.empty(10, 4).updated(data, None, seed=3, task=0)
    c = ReplayBuffer.empty(10, 4).updated(data, None, seed=4, task=0)
    assert np.array_equal(a.pixels, b.pixels) and not np.array_equal(a.pixels, c.pixels)
    a.save(tmp_path / "b.npz")
    r = ReplayBuffer.load(tmp_path / "b.npz")
    assert np.array_equal(r.pixels, a.pixels) and r.capacity == 10


def test_revisited_class_keeps_every_domain() -> None:
    """A known class brought again (a new domain) splits its quota over the experiences that brought it."""
    b0 = ReplayBuffer.empty(capacity=12, image_size=4).updated(_set([0] * 50 + [1] * 50), None, seed=0, task=0)
    b1 = b0.updated(_set([0] * 200 + [1] * 200), None, seed=1, task=1)  # four times as many new-domain images
    b2 = b1.updated(_set([0] * 200 + [1] * 200), None, seed=2, task=2)
    assert b1.class_counts() == {0: 6, 1: 6} and b2.class_counts() == {0: 6, 1: 6}
    assert b1.task_counts(0) == {0: 3, 1: 3}
    assert b2.task_counts(0) == {0: 2, 1: 2, 2: 2} and b2.task_counts(1) == {0: 2, 1: 2, 2: 2}
    assert b2.tasks.dtype == np.int32 and len(b2.tasks) == len(b2)


def test_tags_roundtrip_and_untagged_files_load_as_one_earlier_experience(tmp_path) -> None:
    a = ReplayBuffer.empty(10, 4).updated(_set([0] * 30 + [1] * 30), None, seed=3, task=4)
    a.save(tmp_path / "a.npz")
    assert np.array_equal(ReplayBuffer.load(tmp_path / "a.npz").tasks, np.full(10, 4, np.int32))
    # a buffer file written before entries were tagged
    np.savez(tmp_path / "old.npz", pixels=a.pixels, labels=a.labels, logits=a.logits, limits=np.array([10, 1 << 20]))
    old = ReplayBuffer.load(tmp_path / "old.npz")
    assert np.array_equal(old.tasks, np.full(10, -1, np.int32))
    assert old.updated(_set([0] * 30), None, seed=0, task=1).task_counts(0) == {-1: 3, 1: 2}


def test_a_content_split_keeps_every_image_on_its_side_as_the_folder_grows() -> None:
    from cvm_edge.data import content_holdout_indices

    rng = np.random.default_rng(0)
    keys = [rng.bytes(16) for _ in range(600)]
    labels = np.repeat(np.arange(3), 200)
    _, val_small = content_holdout_indices(keys[:300], labels[:300], 0.2)
    train_big, val_big = content_holdout_indices(keys, labels, 0.2)
    assert set(val_small) <= set(val_big) and not set(val_small) & set(train_big)
    assert 0.15 < len(val_big) / len(keys) < 0.25  # the hash range's share
    # every class of two or more images holds one out and keeps one for training, whatever the hashes
    four = np.asarray([0, 0, 1, 1])
    for fraction in (0.0, 1.0):
        train, val = content_holdout_indices(keys[:4], four, fraction)
        assert sorted(four[val]) == [0, 1] and sorted(four[train]) == [0, 1]
