"""Issue 18, "Store and CLI" (items 10-21): tampered stores and bundles, hostile data folders and
inbox uploads, the lock file, non-Latin class names, labels.csv from Excel, a non-ASCII admin token
and `--no-progress`. Every test drives the real CLI, loader or server app on a real trained store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploy_helpers import generated_images, trained_store, write_folders
from fastapi.testclient import TestClient

from conftest import FAKE_CVM, FASHION_NAMES, run_cli
from cvm_edge.checkpoints import CheckpointStore
from cvm_edge.concepts import ConceptTable, slugify
from cvm_edge.data import list_labelled_files
from cvm_edge.display import printable
from cvm_edge.errors import DataError, ModelLoadError, StoreError
from cvm_edge.fsutil import FileLock, write_pointer
from cvm_edge.inbox import InboxConfig, run_inbox
from deploy.bundle import current_bundle_dir, load_bundle, seal_bundle, verify_bundle
from deploy.server import ServerSettings, create_app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("hard") / "w")


@pytest.fixture()
def store(workdir: Path, tmp_path: Path) -> Path:
    shutil.copytree(workdir, tmp_path / "w")
    return tmp_path / "w"


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("cvm: error: "), err[-2000:]
    return lines[-1]


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "x.png"
    image.write_bytes(generated_images()["rgb.png"][0])
    return image


# ----- 11: rollback verifies the bundle before any pointer moves --------------------------------------
def _clone_version(store: Path, src: int, dst: int) -> None:
    """A copy of checkpoint ``src`` published as ``dst`` (parent ``src``), with a copy of its bundle."""
    ck = store / "checkpoints"
    shutil.copytree(ck / f"v{src:06d}", ck / f"v{dst:06d}")
    meta = json.loads((ck / f"v{dst:06d}" / "meta.json").read_text())
    meta.update(version=dst, parent=src)
    (ck / f"v{dst:06d}" / "meta.json").write_text(json.dumps(meta))
    b = store / "bundles"
    shutil.copytree(b / f"v{src:06d}", b / f"v{dst:06d}")
    manifest = json.loads((b / f"v{dst:06d}" / "manifest.json").read_text())
    manifest.update(name=f"v{dst:06d}", version=dst)
    (b / f"v{dst:06d}" / "manifest.json").write_text(json.dumps(manifest))
    seal_bundle(b / f"v{dst:06d}")
    write_pointer(ck / "LATEST", f"v{dst:06d}")
    write_pointer(b / "CURRENT", f"v{dst:06d}")


def test_rollback_refuses_a_bundle_that_fails_its_sha256_and_moves_no_pointer(store: Path, capsys) -> None:
    _clone_version(store, 2, 3)
    model = store / "bundles" / "v000002" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert run_cli("rollback", "--workdir", str(store)) == 1
    line = _err_line(capsys)
    assert "v000002" in line and "model.onnx" in line and "sha256" in line, line
    assert (store / "checkpoints" / "LATEST").read_text().strip() == "v000003"
    assert (store / "bundles" / "CURRENT").read_text().strip() == "v000003"
    # with the bundle intact the same rollback moves both pointers
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert run_cli("rollback", "--workdir", str(store)) == 0
    assert (store / "checkpoints" / "LATEST").read_text().strip() == "v000002"
    assert (store / "bundles" / "CURRENT").read_text().strip() == "v000002"


# ----- 12: manifest schema, and the manifest covered by a sha256 the loader checks ---------------------
MANIFEST_EDITS: dict[str, Any] = {
    "classes": [1, 2],
    "classes ": "<html><script>alert(1)</script></html>",
    "image_size": 100000,
    "preprocessing": {"image_size": 100000, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "preprocessing ": {"image_size": 32, "mean": ["a", "b", "c"], "std": [0.5, 0.5, 0.5]},
    "version": "two",
    "model_sha256": {"x": 1},
    "outputs": [{"name": "logits"}, "embedding"],
    "logit_scale": "big",
    "name": "../../etc",
    "model_bytes": -5,
}


def _edit_manifest(bundle: Path, key: str, value: Any, reseal: bool) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest[key.strip()] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    if reseal:  # what an editor who knows about manifest.sha256 does: the schema must still refuse it
        seal_bundle(bundle)


@pytest.mark.parametrize("key", sorted(MANIFEST_EDITS))
def test_a_tampered_manifest_is_refused_by_its_seal_and_by_its_schema(store: Path, key: str) -> None:
    bundle = current_bundle_dir(store)
    assert bundle is not None
    original = (bundle / "manifest.json").read_bytes()
    _edit_manifest(bundle, key, MANIFEST_EDITS[key], reseal=False)
    with pytest.raises(ModelLoadError, match=r"manifest\.json sha256 .* does not match manifest\.sha256"):
        load_bundle(bundle)
    (bundle / "manifest.json").write_bytes(original)
    _edit_manifest(bundle, key, MANIFEST_EDITS[key], reseal=True)
    with pytest.raises(ModelLoadError, match=rf"manifest\.json: {key.strip()}"):
        load_bundle(bundle)


def test_relabelled_classes_that_the_concept_table_lacks_are_refused(store: Path) -> None:
    bundle = current_bundle_dir(store)
    assert bundle is not None
    _edit_manifest(bundle, "classes", ["<b>Trouser</b>", "T-shirt/top"], reseal=True)
    with pytest.raises(ModelLoadError, match=r"classes are not the names of concepts\.npz"):
        load_bundle(bundle)


def test_the_server_never_serves_a_tampered_manifest(store: Path, tmp_path: Path) -> None:
    """/v1/model and /v2/models/cvm answer without a 5xx from a manifest field, and serve no tampered label."""
    source = current_bundle_dir(store)
    assert source is not None
    image = generated_images()["rgb.jpg"][0]
    for key in ("classes ", "outputs", "logit_scale"):
        bundle = tmp_path / key.strip()
        shutil.copytree(source, bundle)
        _edit_manifest(bundle, key, MANIFEST_EDITS[key], reseal=True)
        with TestClient(create_app(ServerSettings(bundle=bundle))) as c:
            model = c.get("/v1/model")
            assert model.status_code == 200 and model.json()["manifest"] is None, (key, model.text)
            assert model.json()["ready"] is False and "manifest.json" in model.json()["last_reload_error"]["error"]
            meta = c.get("/v2/models/cvm")
            assert meta.status_code == 503 and set(meta.json()) == {"error"}, (key, meta.text)
            r = c.post("/v1/classify", content=image)
            assert r.status_code == 503 and "manifest.json" in r.json()["error"], (key, r.text)


# ----- 13: every checkpoint file is hashed in meta.json and checked on load -----------------------------
def test_checkpoint_files_carry_sha256_and_a_flipped_byte_is_refused_by_name(
    store: Path, tmp_path: Path, capsys
) -> None:
    version = store / "checkpoints" / "v000002"
    meta = json.loads((version / "meta.json").read_text())
    assert set(meta["files"]) == {"model.pt", "plugins.pt", "concepts.npz", "buffer.npz", "val.npz"}
    for name, digest in meta["files"].items():
        assert hashlib.sha256((version / name).read_bytes()).hexdigest() == digest
    model = version / "model.pt"
    data = bytearray(model.read_bytes())
    for i in range(16):  # 16 bytes in the middle of the tensor data: torch still loads it
        data[len(data) // 2 + i * 97] ^= 0x5A
    model.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"model\.pt: sha256 .* does not match"):
        CheckpointStore(store).load()
    for argv in (["predict", "--workdir", str(store), str(_image(tmp_path))], ["export", "--workdir", str(store)]):
        assert run_cli(*argv) == 1
        assert "model.pt" in _err_line(capsys)
    assert not (store / "bundles" / "v000002.2").exists()


# ----- 14: meta.json schema --------------------------------------------------------------------------
META_EDITS: dict[str, Any] = {
    "model.image_size": 100000,
    "preprocessing.image_size": 100000,
    "preprocessing.mean": ["a", 1, 2],
    "seen": [0, 99],
    "seen_names": "Trouser",
    "history": ["not an entry"],
    "history.0": {"task": 1},
    "model": "resnet",
    "model.mapper_hidden": "512",
    "version": 7,
    "format": 2,
    "files": {"model.pt": "beef"},
}


def _edit_meta(version: Path, dotted: str, value: Any) -> None:
    meta = json.loads((version / "meta.json").read_text())
    head, _, tail = dotted.partition(".")
    if not tail:
        meta[head] = value
    elif tail.isdigit():
        meta[head][int(tail)] = value
    else:
        meta[head][tail] = value
    (version / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("field", sorted(META_EDITS))
def test_a_tampered_meta_json_gives_one_line_naming_it(store: Path, tmp_path: Path, field: str, capsys) -> None:
    version = store / "checkpoints" / "v000002"
    _edit_meta(version, field, META_EDITS[field])
    assert run_cli("predict", "--workdir", str(store), str(_image(tmp_path))) == 1, field
    line = _err_line(capsys)
    assert "meta.json" in line and field.split(".")[0] in line, (field, line)
    if run_cli("status", "--workdir", str(store)) != 0:  # status reads meta.json only: one line or a report
        line = _err_line(capsys)
        assert "meta.json" in line and field.split(".")[0] in line, (field, line)
    assert "Traceback" not in capsys.readouterr().err


def test_weights_that_do_not_fit_the_recorded_model_give_one_line(store: Path, tmp_path: Path, capsys) -> None:
    _edit_meta(store / "checkpoints" / "v000002", "model.mapper_hidden", 256)  # valid, but not these weights
    assert run_cli("predict", "--workdir", str(store), str(_image(tmp_path))) == 1
    assert "does not build into a model" in _err_line(capsys)


def test_meta_json_that_is_not_json_is_refused(store: Path, capsys) -> None:
    (store / "checkpoints" / "v000002" / "meta.json").write_text('{"format": 1, "version": NaN')
    assert run_cli("status", "--workdir", str(store)) == 1
    assert "meta.json" in _err_line(capsys)


# ----- 15: only regular, bounded files are opened ----------------------------------------------------
def _cli(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "cvm_edge.cli", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_fifo_or_a_huge_sparse_file_in_labels_csv_is_refused_without_blocking(store: Path, tmp_path: Path) -> None:
    data = write_folders(tmp_path / "data", [0], 10)
    first = sorted(data.rglob("*.png"))[0].relative_to(data)
    os.mkfifo(data / "pipe.png")
    sparse = data / "huge.png"
    with open(sparse, "wb") as fh:
        fh.write(generated_images()["rgb.png"][0][:64])
        fh.truncate(1536 << 20)  # 1.5 GB, no blocks on disk
    (data / "labels.csv").write_text(f"path,label\n{first},T-shirt/top\npipe.png,T-shirt/top\nhuge.png,T-shirt/top\n")
    try:
        proc = _cli(
            "update", "--workdir", str(store), "--data", str(data), "--no-progress", "--epochs", "1", timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("cvm update blocked on a FIFO named in labels.csv")
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "pipe.png" in err and "FIFO" in err and "huge.png" in err and "over the limit" in err, err
    assert CheckpointStore(store).latest() == 2
    with FileLock(store / ".lock", "test"):  # the lock was released
        pass
    try:  # the same rule for `cvm predict IMAGE`
        proc = _cli("predict", "--workdir", str(store), str(data / "pipe.png"), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("cvm predict blocked on a FIFO")
    assert proc.returncode == 2 and "FIFO" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_bundle_model_that_is_a_fifo_or_a_device_is_refused_at_once(store: Path, kind: str) -> None:
    bundle = current_bundle_dir(store)
    assert bundle is not None
    (bundle / "model.onnx").unlink()
    if kind == "fifo":
        os.mkfifo(bundle / "model.onnx")
    else:
        (bundle / "model.onnx").symlink_to("/dev/zero")
    code = (
        "import sys\nfrom deploy.bundle import verify_bundle\nfrom cvm_edge.errors import ModelLoadError\n"
        f"try:\n    verify_bundle({str(store)!r}, {bundle.name!r})\nexcept ModelLoadError as e:\n    print(e); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a bundle whose model.onnx is a {kind} did not return")
    assert proc.returncode == 3 and "not a regular file" in proc.stdout, proc.stdout + proc.stderr[-1000:]
    with pytest.raises(ModelLoadError, match="not a regular file"):
        verify_bundle(store, bundle.name)


# ----- 16: folder mode follows the same rule as labels.csv -------------------------------------------
def test_folder_mode_refuses_links_that_lead_out_of_the_data_folder(tmp_path: Path, fashion_table: Path) -> None:
    table = ConceptTable.load(fashion_table)
    data = write_folders(tmp_path / "data", [0, 1], 3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(generated_images()["rgb.png"][0])
    assert len(list_labelled_files(data, table)) == 6
    link = data / slugify(FASHION_NAMES[0]) / "linked.png"
    link.symlink_to(outside / "secret.png")
    with pytest.raises(DataError, match="leads outside the data folder"):
        list_labelled_files(data, table)
    link.unlink()
    (data / slugify(FASHION_NAMES[2])).symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="leads outside the data folder"):
        list_labelled_files(data, table)
    (data / slugify(FASHION_NAMES[2])).unlink()
    inside = data / slugify(FASHION_NAMES[1]) / "again.png"  # a link that stays inside is a file like any other
    inside.symlink_to(sorted((data / slugify(FASHION_NAMES[0])).glob("*.png"))[0])
    assert len(list_labelled_files(data, table)) == 7
    (data / "labels.csv").symlink_to(outside / "secret.png")
    with pytest.raises(DataError, match="leads outside the data folder"):
        list_labelled_files(data, table)


# ----- 17: the lock file is never opened through a link ----------------------------------------------
def test_a_lock_file_planted_as_a_symlink_is_refused(store: Path, tmp_path: Path, capsys) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (store / ".lock").unlink(missing_ok=True)
    (store / ".lock").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        FileLock(store / ".lock", "test").acquire()
    assert run_cli("rollback", "--workdir", str(store)) == 1
    assert "symbolic link" in _err_line(capsys)
    assert victim.read_text() == "precious\n"
    assert CheckpointStore(store).latest() == 2


# ----- 18: non-Latin class names; names printed escaped -----------------------------------------------
def _table(names: list[str]) -> ConceptTable:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(len(names), 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return ConceptTable(tuple(names), v.astype(np.float16), "enc", "0" * 64, ("{}",), "now")


def test_non_latin_class_names_are_accepted_with_safe_slugs(tmp_path: Path) -> None:
    names = ["猫", "Пуловер", "حذاء", "हिन्दी", "Café", "T-shirt/top"]
    table = _table(names)
    slugs = [slugify(n) for n in names]
    assert slugs == ["猫", "пуловер", "حذاء", "हिन्दी", "café", "t-shirt-top"]
    for s in [*slugs, slugify("猫" * 200), slugify("../..\x1b[31m/\n.")]:
        assert s and "/" not in s and "\x00" not in s and s not in (".", "..") and printable(s) == s
        assert len(s.encode()) <= 255
    assert table.lookup("caf") == names.index("Café")  # the slug earlier releases gave still matches
    data = tmp_path / "data"
    for i, s in enumerate(slugs):
        (data / s).mkdir(parents=True)
        (data / s / f"{i}.png").write_bytes(generated_images()["rgb.png"][0])
    pairs = list_labelled_files(data, table)
    assert sorted(c for _, c in pairs) == list(range(len(names)))


def test_names_are_printed_with_control_characters_escaped(tmp_path: Path, capsys) -> None:
    from cvm_edge.update_report import UpdateReport, describe_update

    evil = "cat\x1b[2J\x1b[31m\nfake: line\r\u202etxt"
    assert printable(evil) == "cat\\x1b[2J\\x1b[31m\\nfake: line\\r\\u202etxt"
    entry = {
        "task": 2,
        "kind": "class-incremental",
        "trained_classes": [1],
        "new_classes": [1],
        "new_class_names": [evil, "猫"],
        "n_train": 3,
        "wall_s": 1.0,
        "new_accuracy": 0.5,
        "old_accuracy": None,
        "old_accuracy_before": None,
    }
    for text in (describe_update(entry), UpdateReport(3, entry).summary()):
        assert "\x1b" not in text and "\r" not in text and "\u202e" not in text and "猫" in text
        assert all(not line.startswith("fake") for line in text.splitlines())
    # an error message that names a path or a class holds them escaped: one line, no escape sequence
    assert run_cli("status", "--workdir", str(tmp_path / "no\x1b[31mstore\nx")) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1, err


# ----- 19: labels.csv from Excel; one image with two labels ---------------------------------------------
def test_labels_csv_with_a_bom_is_read_and_conflicting_labels_are_refused(tmp_path: Path, fashion_table: Path) -> None:
    table = ConceptTable.load(fashion_table)
    data = write_folders(tmp_path / "data", [0, 1], 2)
    files = sorted(p.relative_to(data) for p in data.rglob("*.png"))
    rows = [f"{files[0]},T-shirt/top", f"{files[1]},T-shirt/top", f"{files[2]},Trouser", f"{files[2]},Trouser"]
    (data / "labels.csv").write_bytes(("\ufeffpath,label\r\n" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    pairs = list_labelled_files(data, table)
    assert [c for _, c in pairs] == [0, 0, 1]  # the BOM is not part of the header; a repeated row counts once
    rows.append(f"./{files[0]},Trouser")
    (data / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"labels\.csv:6: .* labelled 'Trouser', but line 2 labels the same image"):
        list_labelled_files(data, table)


# ----- 20: the admin token is UTF-8 --------------------------------------------------------------------
def test_a_non_ascii_admin_token_is_compared_as_utf8(workdir: Path, tmp_path: Path) -> None:
    """A real `cvm serve` with CVM_ADMIN_TOKEN set to non-ASCII text; the header bytes go over the socket as sent."""
    import httpx

    from bench.reliability.common import running_server

    token = "clé-пароль-鍵-🔑"
    env = {"CVM_ADMIN_TOKEN": token}
    with running_server(["--workdir", str(workdir)], tmp_path / "server.log", env) as server:
        url = server.url + "/v1/admin/reload"

        def status(value: bytes) -> int:
            return httpx.post(url, headers={"Authorization": b"Bearer " + value}, timeout=30).status_code

        assert status(token.encode("utf-8")) == 200
        assert status(token[:-1].encode("utf-8")) == 401
        assert status("clé".encode("latin-1")) == 401
    with running_server(["--workdir", str(workdir)], tmp_path / "server2.log", {"CVM_ADMIN_TOKEN": "clé"}) as server:
        url = server.url + "/v1/admin/reload"
        assert httpx.post(url, headers={"Authorization": b"Bearer cl\xe9"}, timeout=30).status_code == 401  # latin-1
        assert httpx.post(url, headers={"Authorization": "Bearer clé".encode()}, timeout=30).status_code == 200


# ----- 21: --no-progress turns the "reading images" bar off ---------------------------------------------
def test_no_progress_prints_no_reading_images_bar(store: Path, tmp_path: Path, capsys) -> None:
    data = write_folders(tmp_path / "data", [0], 5)
    (data / slugify(FASHION_NAMES[0]) / "broken.png").write_bytes(b"\x89PNG not really")
    argv = ["update", "--workdir", str(store), "--data", str(data), "--epochs", "1"]
    assert run_cli(*argv) == 1  # stops after reading every image: the bar has been drawn by then
    assert "reading images" in capsys.readouterr().err
    assert run_cli(*argv, "--no-progress") == 1
    err = capsys.readouterr().err
    assert "reading images" not in err and "broken.png" in err, err


# ----- 10: the inbox ---------------------------------------------------------------------------------
def _upload(path: Path, bad: bool = False) -> Path:
    (path / "bag").mkdir(parents=True)
    (path / "bag" / "0.png").write_bytes(b"png")
    if bad:
        (path / "BAD").write_text("")
    return path


def test_inbox_uploads_cannot_write_outside_their_folder_or_block_later_ones(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "cvm"
    fake.write_text(FAKE_CVM)
    fake.chmod(0o755)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    spool, store = tmp_path / "spool", tmp_path / "store"
    (store / "checkpoints").mkdir(parents=True)
    write_pointer(store / "checkpoints" / "LATEST", "v000001")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched\n")
    # the attack of the issue: a link named like the log, pointing at the store's LATEST
    evil = _upload(spool / "inbox" / "evil")
    (evil / "cvm-update.log").symlink_to(store / "checkpoints" / "LATEST")
    (evil / ".cvm-latest-before").symlink_to(outside / "keep.txt")
    newline = _upload(spool / "inbox" / "new\nline")
    os.utime(newline, (1, 1))  # the oldest: learned first
    _upload(spool / "inbox" / "bad-one", bad=True)
    (spool / "inbox" / "link-to-outside").symlink_to(outside, target_is_directory=True)
    (spool / "inbox" / "stray.txt").write_text("not a folder")
    _upload(spool / "inbox" / "ünïcødé 猫")
    _upload(spool / "inbox" / os.fsdecode(b"raw\xffbytes"))  # not UTF-8
    cfg = InboxConfig(workdir=store, spool=spool, update_args=("--epochs", "3"), cvm=(str(fake),))
    report = run_inbox(cfg)
    assert len(report.done) == 4 and len(report.failed) == 3, report
    assert os.listdir(spool / "inbox") == [] and os.listdir(spool / "processing") == []
    names = {(spool / q / j / "name").read_text().strip(): q for q in ("done", "failed") for j in os.listdir(spool / q)}
    assert names == {
        "evil": "done",
        "new\nline": "done",
        "ünïcødé 猫": "done",
        "raw\\udcffbytes": "done",  # recorded escaped
        "bad-one": "failed",
        "link-to-outside": "failed",
        "stray.txt": "failed",
    }
    assert (store / "checkpoints" / "LATEST").read_text() == "v000005\n"  # written by updates only
    assert (outside / "keep.txt").read_text() == "untouched\n" and os.listdir(outside) == ["keep.txt"]
    failed_logs = "".join((spool / "failed" / j / "cvm-update.log").read_text() for j in os.listdir(spool / "failed"))
    assert "not in the concept table" in failed_logs and "symbolic link" in failed_logs
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 5 and all(c.startswith("update --workdir") and c.endswith("--epochs 3") for c in calls)
    assert "new\nline" not in "".join(calls)  # every update gets a path of our choosing


def test_inbox_recovers_interrupted_jobs_as_power_loss_md_says(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "cvm"
    fake.write_text(FAKE_CVM)
    fake.chmod(0o755)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    spool, store = tmp_path / "spool", tmp_path / "store"
    cfg = InboxConfig(workdir=store, spool=spool, cvm=(str(fake),))
    _upload(spool / "inbox" / "first")
    run_inbox(cfg)  # LATEST v000002
    # left by the shell script of earlier releases: the upload itself, LATEST from before inside it
    legacy = _upload(spool / "processing" / "cut-during-training")
    (legacy / ".cvm-latest-before").write_text("v000002\n")
    # left by cvm inbox after the checkpoint was published but before the bundle: export only
    cut = spool / "processing" / "20260101T000000Z-0001-cut-during-export"
    _upload(cut / "data")
    (cut / "name").write_text("cut-during-export\n")
    (cut / "latest-before").write_text("v000001\n")
    write_pointer(store / "bundles" / "CURRENT", "v000001")
    (tmp_path / "calls").write_text("")
    report = run_inbox(cfg)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"export --workdir {store}" and calls[1].startswith("update --workdir"), calls
    assert len(report.done) == 2 and not report.failed
    assert (store / "bundles" / "CURRENT").read_text() == (store / "checkpoints" / "LATEST").read_text()


# ----- a version is never published with a meta.json that would not read back ------------------------
def test_a_history_entry_that_would_not_read_back_is_refused_before_the_version_is_published(store: Path) -> None:
    """meta.json is read back strictly (no NaN, a schema): a history entry carrying NaN (a fleet round's
    accuracy over no images, say) used to be written anyway, and the store could not be loaded again."""
    import dataclasses

    from cvm_edge.checkpoints import CheckpointStore

    cs = CheckpointStore(store)
    before = cs.latest()
    ckpt = cs.load()
    bad = dataclasses.replace(ckpt, history=(*ckpt.history, {"kind": "fleet", "all_accuracy": float("nan")}))
    with pytest.raises(StoreError, match="read back"):
        cs.save(bad)
    assert cs.latest() == before and cs.versions()[-1] == before
    assert cs.load().history == ckpt.history  # still loads, unchanged
