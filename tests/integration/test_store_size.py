"""Issue 17, item 7: stores stay small on device flash. Old versions are pruned (never the current one nor
the serving bundle's, crash-safely), and held-out and replay images are stored as lossless PNG."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import init_store, run_cli, update_store
from cvm_edge import checkpoints
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.checkpoints import BACKBONE_FILE, BUNDLE_VERSION_RE, CheckpointStore, _load_imageset, _save_imageset
from cvm_edge.data import ImageSet
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import TMP_PREFIX, write_pointer
from cvm_edge.image_codec import decode_images, encode_images
from deploy.bundle import NAME_RE


def _versions_up_to(store: CheckpointStore, last: int) -> None:
    """Publish copies of the current version until ``last`` exists (no training: pruning is what is tested)."""
    ckpt = store.load()
    while store.versions()[-1] < last:
        store.save(ckpt)


def _fake_bundle(workdir: Path, name: str) -> None:
    d = workdir / "bundles" / name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}\n")


@pytest.fixture()
def small_store(fashion_table: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "w"
    init_store(wd, fashion_table, "--buffer-size", "20", "--keep-versions", "3")
    return wd


def test_bundle_names_agree_with_the_serving_side() -> None:
    for name in ("v000003", "v000003-int8", "v000003-fp16.2", "v000003.4", "v00003", "v000003-int4", "latest"):
        assert bool(BUNDLE_VERSION_RE.match(name)) == bool(NAME_RE.match(name)), name


def test_prune_keeps_newest_n_latest_and_the_serving_bundles_version(small_store: Path) -> None:
    store = CheckpointStore(small_store)
    _versions_up_to(store, 7)
    for name in ("v000002", "v000002-int8", "v000004", "v000004-int8.2", "v000006"):
        _fake_bundle(small_store, name)
    write_pointer(small_store / "bundles" / "CURRENT", "v000002")  # an old bundle is being served
    store.rollback(to=3)  # and LATEST names an old version
    assert store.keep_setting() == 3
    assert store.kept_versions(3) == [2, 3, 5, 6, 7]
    assert store.prune(3) == [1, 4]
    assert store.versions() == [2, 3, 5, 6, 7] and store.latest() == 3
    # the pruned version's bundles went with it; the serving one and those of kept versions stayed
    assert sorted(p.name for p in (small_store / "bundles").iterdir()) == [
        "CURRENT",
        "v000002",
        "v000002-int8",
        "v000006",
    ]
    for v in store.versions():
        store.load(v)
    assert not [p for p in (small_store / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert store.prune(0) == [] and store.prune(3) == []  # 0 keeps all; pruning again removes nothing


def test_a_kill_between_rename_and_remove_leaves_a_loadable_store(small_store: Path) -> None:
    store = CheckpointStore(small_store)
    _versions_up_to(store, 5)
    code = f"from cvm_edge.checkpoints import CheckpointStore; CheckpointStore({str(small_store)!r}).prune(3)"
    env = dict(os.environ, CVM_FAULT_AT="prune_renamed:exit")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    # v000001 was renamed away (atomically) and not yet deleted: every listed version is whole
    assert store.versions() == [2, 3, 4, 5] and store.latest() == 5
    for v in store.versions():
        store.load(v)
    left = [p for p in (small_store / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(left) == 1 and "v000001" in left[0].name
    assert store.clean_stale() == left  # what the next writer does first
    assert store.prune(3) == [2] and store.versions() == [3, 4, 5]


def test_update_prunes_and_status_and_rollback_say_what_is_kept(
    small_store: Path, class_folders, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(small_store)
    _versions_up_to(store, 3)
    data = class_folders([0, 1], per_class=12)
    assert update_store(small_store, data, "--epochs", "1", "--balance-epochs", "0", "--keep-versions", "2") == 0
    assert "removed older versions v000001, v000002 (--keep-versions)" in capsys.readouterr().out
    assert store.versions() == [3, 4] and store.keep_setting() == 2  # the update's setting is the store's now
    assert run_cli("status", "--workdir", str(small_store)) == 0
    out = capsys.readouterr().out
    assert "keeps the newest 2 versions" in out and "kept now: v3, v4" in out
    assert run_cli("rollback", "--workdir", str(small_store), "--to", "1") == 1
    err = capsys.readouterr().err
    assert "v000001 is no longer kept" in err and "newest 2 versions" in err and "Kept: v000003, v000004" in err
    assert store.latest() == 4
    assert run_cli("rollback", "--workdir", str(small_store), "--to", "9") == 1
    assert "v000009 does not exist" in capsys.readouterr().err


def _images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    grey = np.repeat(rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), 3, axis=-1)
    return np.concatenate([colour, grey, np.zeros((1, size, size, 3), np.uint8)])


def test_encoded_images_round_trip_bit_identical(tmp_path: Path) -> None:
    pixels = _images(5, 17, 0)
    packed = encode_images(pixels)
    assert np.array_equal(decode_images(packed["png"], packed["png_offsets"], packed["image_shape"]), pixels)
    empty = encode_images(pixels[:0])
    assert decode_images(empty["png"], empty["png_offsets"], empty["image_shape"]).shape == (0, 17, 17, 3)

    labels = np.arange(len(pixels), dtype=np.int64)
    _save_imageset(tmp_path / "val.npz", ImageSet(pixels, labels))
    with np.load(tmp_path / "val.npz") as z:
        assert "pixels" not in z.files  # encoded on disk
    back = _load_imageset(tmp_path / "val.npz")
    assert np.array_equal(back.pixels, pixels) and np.array_equal(back.labels, labels)

    buf = ReplayBuffer(
        50, 1 << 20, pixels, labels, np.ones((len(labels), 4), np.float16), np.zeros(len(labels), np.int32)
    )
    buf.save(tmp_path / "buffer.npz")
    r = ReplayBuffer.load(tmp_path / "buffer.npz")
    assert np.array_equal(r.pixels, pixels) and np.array_equal(r.logits, buf.logits) and r.capacity == 50


def test_a_damaged_encoded_image_is_refused(tmp_path: Path) -> None:
    packed = encode_images(_images(2, 8, 1))
    with pytest.raises(ValueError, match="partition"):
        decode_images(packed["png"][:-1], packed["png_offsets"], packed["image_shape"])
    with pytest.raises(ValueError, match="expected 9x9"):
        decode_images(packed["png"], packed["png_offsets"], np.array([9, 9, 3]))


def _old_val_npz(path: Path, data: ImageSet) -> None:  # the writer of stores made before this issue
    buf = io.BytesIO()
    np.savez(buf, pixels=data.pixels, labels=data.labels)
    path.write_bytes(buf.getvalue())


def _old_buffer_bytes(b: ReplayBuffer) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, pixels=b.pixels, labels=b.labels, logits=b.logits, limits=np.array([b.capacity, b.max_bytes]))
    return buf.getvalue()


def test_a_store_with_raw_pixel_files_still_loads(small_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(small_store)
    pixels = _images(3, 32, 2)
    labels = np.arange(len(pixels), dtype=np.int64) % 2
    ckpt = store.load()
    buffer = ReplayBuffer(
        20, 1 << 20, pixels, labels, np.zeros((len(labels), 0), np.float16), np.zeros(len(labels), np.int32)
    )
    monkeypatch.setattr(checkpoints, "_save_imageset", _old_val_npz)
    monkeypatch.setattr(ReplayBuffer, "to_bytes", _old_buffer_bytes)
    v = store.save(dataclasses.replace(ckpt, val=ImageSet(pixels, labels), buffer=buffer))
    monkeypatch.undo()
    with np.load(store.path(v) / "val.npz") as z:
        assert "pixels" in z.files
    loaded = store.load(v)
    assert np.array_equal(loaded.val.pixels, pixels) and np.array_equal(loaded.buffer.pixels, pixels)
    assert loaded.keep_versions == 3


def test_a_frozen_backbone_takes_flash_once_and_each_version_stays_whole(fashion_table: Path, tmp_path: Path) -> None:
    wd = tmp_path / "frozen"
    init_store(wd, fashion_table, "--buffer-size", "20", "--train-backbone", "none", "--keep-versions", "2")
    store = CheckpointStore(wd)
    _versions_up_to(store, 3)
    files = [store.path(v) / BACKBONE_FILE for v in (1, 2, 3)]
    assert len({f.stat().st_ino for f in files}) == 1 and files[0].stat().st_nlink == 3  # one copy on disk
    assert not [k for k in torch.load(store.path(3) / "model.pt", weights_only=True) if k.startswith("backbone.")]
    whole = store.load(1).weights
    assert store.prune(2) == [1]  # removing a version removes its name only
    for v in (2, 3):
        weights = store.load(v).weights
        assert weights.keys() == whole.keys() and all(torch.equal(weights[k], whole[k]) for k in whole)
    data = bytearray(files[2].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[2].unlink()  # a damaged copy (written anew, as a bad block reads): refused by its sha256
    files[2].write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"backbone\.pt: sha256 .* does not match"):
        store.load(3)
    store.load(2)
