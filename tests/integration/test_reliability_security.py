"""Issue 5, item 6: the admin token, the default bind address, user strings that try to reach
paths outside the work directory, weights-only checkpoint loading and bundle verification."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from deploy_helpers import generated_images, trained_store
from fastapi.testclient import TestClient

from bench.reliability.common import record, running_server
from conftest import run_cli
from cvm_edge.checkpoints import CheckpointStore, parse_version
from cvm_edge.errors import StoreError
from cvm_edge.fsutil import write_pointer
from deploy.bundle import current_bundle_dir, seal_bundle
from deploy.server import ServerSettings, create_app

TOKEN = "s3cret-admin-token-for-tests"
FIGURES: dict[str, Any] = {}
HOSTILE = ("../../etc", "/etc/passwd", "v000002/../../x", "v2\x00", "\x00", "9" * 5000, "v" + "0" * 300 + "2", "~root")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    return trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("sec") / "w")


@pytest.fixture()
def store_copy(workdir: Path, tmp_path: Path) -> Path:
    shutil.copytree(workdir, tmp_path / "w")
    return tmp_path / "w"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----- admin endpoints ------------------------------------------------------------------------------
def test_admin_reload_is_off_without_a_token_and_needs_the_exact_token(workdir: Path, monkeypatch) -> None:
    bundle = current_bundle_dir(workdir)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("deploy.server.v1.hmac.compare_digest", spy)
    off, on = (create_app(ServerSettings(bundle=bundle, admin_token=t)) for t in (None, TOKEN))
    with TestClient(off) as a, TestClient(on) as b:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            r = a.post("/v1/admin/reload", headers=headers)
            assert r.status_code == 404 and "disabled" in r.json()["error"]
        wrong = [
            {},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer "},
            {"Authorization": f"Bearer {TOKEN[:-1]}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Bearer {TOKEN.upper()}"},
            {"Authorization": "Bearer " + "A" * 10000},
        ]
        for headers in wrong:
            r = b.post("/v1/admin/reload", headers=headers)
            assert r.status_code == 401 and set(r.json()) == {"error"}, headers
            assert r.headers.get("www-authenticate") == "Bearer"
        assert b.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert b.post("/v1/admin/reload", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        assert b.get("/v1/admin/reload").status_code == 405  # no other verb, no other admin route
    assert compared and all(t == TOKEN.encode() for _, t in compared)  # every check is constant-time
    admin_routes = sorted(r.path for r in on.routes if "/admin" in getattr(r, "path", ""))
    assert admin_routes == ["/v1/admin/reload"]
    FIGURES["admin"] = {"wrong_tokens_refused": len(wrong), "constant_time_compares": len(compared)}


def test_an_empty_token_variable_disables_the_admin_endpoint(monkeypatch, workdir: Path) -> None:
    captured: list[ServerSettings] = []
    monkeypatch.setattr("deploy.server.serve", captured.append)
    for value in ("", None):
        if value is None:
            monkeypatch.delenv("CVM_ADMIN_TOKEN", raising=False)
        else:
            monkeypatch.setenv("CVM_ADMIN_TOKEN", value)
        assert run_cli("serve", "--workdir", str(workdir)) == 0
    assert [s.admin_token for s in captured] == [None, None]
    assert all(s.host == "127.0.0.1" for s in captured)  # the default bind address


# ----- bind address -------------------------------------------------------------------------------
def _listening(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.partition(":")
            if int(p, 16) == port and state == "0A":
                out.append(addr)
    return out


def test_the_server_binds_loopback_by_default(workdir: Path, tmp_path: Path) -> None:
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp here")
    with running_server(["--workdir", str(workdir)], tmp_path / "server.log") as server:
        addrs = _listening(server.port)
        assert addrs == ["0100007F"], addrs  # 127.0.0.1 only: not 0.0.0.0, not ::
        FIGURES["bind"] = {"listening_on": "127.0.0.1"}


# ----- user strings and paths -----------------------------------------------------------------------
def test_hostile_versions_are_refused_before_any_path_is_built(store_copy: Path, capsys) -> None:
    before = _tree(store_copy.parent)
    for text in HOSTILE:
        with pytest.raises(StoreError):
            parse_version(text)
        assert run_cli("rollback", "--workdir", str(store_copy), "--to", text) == 1, text
        assert run_cli("export", "--workdir", str(store_copy), "--version", text) == 1, text
        err = capsys.readouterr().err
        assert err.startswith("cvm: error: ") and "Traceback" not in err and len(err) < 400, err
    assert _tree(store_copy.parent) == before
    assert CheckpointStore(store_copy).latest() == 2
    FIGURES["versions_refused"] = len(HOSTILE)


def test_hostile_pointers_are_refused(store_copy: Path) -> None:
    for text in HOSTILE:
        write_pointer(store_copy / "bundles" / "CURRENT", text.replace("\x00", "\\0"))
        with pytest.raises(StoreError):
            current_bundle_dir(store_copy)
        write_pointer(store_copy / "checkpoints" / "LATEST", text.replace("\x00", "\\0"))
        with pytest.raises(StoreError):
            CheckpointStore(store_copy).latest()
        assert run_cli("status", "--workdir", str(store_copy)) == 1


def test_labels_csv_paths_outside_the_data_folder_are_refused(store_copy: Path, tmp_path: Path, capsys) -> None:
    from deploy_helpers import write_folders

    data = write_folders(tmp_path / "data", [0], 10)
    outside = tmp_path / "outside.png"
    outside.write_bytes(generated_images()["rgb.png"][0])
    first = sorted(data.rglob("*.png"))[0].relative_to(data)
    hostile = [
        "../outside.png",
        str(outside),
        f"{first}/../../../outside.png",
        "t-shirt-top/\x00.png",
        "a/" * 3000 + "x.png",
        "x" * 5000 + ".png",
        "~/outside.png",
    ]
    for rel in hostile:
        (data / "labels.csv").write_text(f"path,label\n{first},T-shirt/top\n{rel},T-shirt/top\n")
        code = run_cli("-q", "update", "--workdir", str(store_copy), "--data", str(data), "--epochs", "1")
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the "reading images" progress bar
        assert code == 1, (rel[:40], err)
        assert last.startswith("cvm: error: ") and "Traceback" not in err, (rel[:40], err[-500:])
    assert CheckpointStore(store_copy).latest() == 2
    FIGURES["labels_csv_paths_refused"] = len(hostile)


def test_hostile_class_names_never_become_paths(tmp_path: Path, sample, capsys) -> None:
    """Class names are data: refused when they hold a NUL byte or run over 200 characters, and
    otherwise never used as a path (folders are matched by slug; bundles and checkpoints are
    named by version only)."""
    import numpy as np
    from PIL import Image

    for bad in ("a\x00b", "x" * 5000):
        (tmp_path / "bad.txt").write_text(bad + "\n")
        assert (
            run_cli("-q", "embed", "build", "--classes", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "b.npz"))
            == 1
        )
        assert "not allowed" in capsys.readouterr().err
    names = ["../../../escaped", "/tmp/cvm-absolute-escape"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    table = tmp_path / "t.npz"
    assert run_cli("-q", "embed", "build", "--classes", str(tmp_path / "classes.txt"), "--out", str(table)) == 0
    data = tmp_path / "data"
    data.mkdir()
    rows = ["path,label"]
    for c, name in enumerate(names):
        for i in np.flatnonzero(sample["train_labels"] == c)[:15]:
            Image.fromarray(sample["train_images"][i]).save(data / f"{c}-{i}.png")
            rows.append(f"{c}-{i}.png,{name}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    wd = tmp_path / "deep" / "w"
    before_outside = _tree(tmp_path.parent) - {s for s in _tree(tmp_path.parent) if s.startswith(tmp_path.name)}
    from conftest import init_store

    init_store(wd, table, "--buffer-size", "10")
    assert (
        run_cli("-q", "update", "--workdir", str(wd), "--data", str(data), "--epochs", "1", "--balance-epochs", "0")
        == 0
    )
    assert json.loads((current_bundle_dir(wd) / "manifest.json").read_text())["classes"] == names  # type: ignore[operator]
    created = (
        _tree(tmp_path)
        - {"classes.txt", "t.npz", "bad.txt", "data"}
        - {s for s in _tree(tmp_path) if s.startswith("data/")}
    )
    assert all(s.startswith("deep") for s in created), sorted(created)
    assert not any("escaped" in s or "absolute" in s for s in _tree(tmp_path)), sorted(created)
    after_outside = _tree(tmp_path.parent) - {s for s in _tree(tmp_path.parent) if s.startswith(tmp_path.name)}
    assert after_outside - before_outside == set() or all("pytest" in s for s in after_outside - before_outside)
    assert not Path("/tmp/cvm-absolute-escape").exists() and not (tmp_path.parents[2] / "escaped").exists()
    FIGURES["hostile_class_names"] = {"refused": 2, "accepted_as_data_only": len(names)}


def test_model_names_and_filenames_in_requests_are_never_paths(workdir: Path, tmp_path: Path) -> None:
    app = create_app(ServerSettings(bundle=current_bundle_dir(workdir)))
    png = generated_images()["rgb.png"][0]
    marker = tmp_path / "written-by-upload"
    with TestClient(app) as c:
        for name in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "cvm%00", "a" * 4000, "cvm%2F..%2Fcvm"):
            for method, suffix in (("GET", ""), ("GET", "/ready"), ("POST", "/infer")):
                r = c.request(method, f"/v2/models/{name}{suffix}", json={})
                assert r.status_code == 404 and set(r.json()) == {"error"}, (name, suffix, r.text)
        for filename in (f"../../../..{marker}", str(marker), "a\x00b.png", "x" * 5000):
            r = c.post(
                "/v1/classify", files=[("file", (filename, png, "image/png")), ("file", ("b.png", png, "image/png"))]
            )
            if len(filename) > 1000:  # over the multipart parser's header limit: a plain 400
                assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
            else:  # echoed back as data, nothing more
                assert r.status_code == 200 and isinstance(r.json()["results"][0]["filename"], str), r.text
    assert not marker.exists()


class _Exploit:
    """Unpickling this runs code: it creates a marker file. weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("member", ["model.pt", "plugins.pt"])
def test_checkpoints_load_weights_only(store_copy: Path, tmp_path: Path, member: str, capsys) -> None:
    marker = tmp_path / f"pwned-{member}"
    version_dir = store_copy / "checkpoints" / "v000002"
    torch.save({"weights": _Exploit(marker)}, version_dir / member)
    # record the new file's sha256 too, so what refuses it is weights_only (the hash check is tested elsewhere)
    meta = json.loads((version_dir / "meta.json").read_text())
    meta["files"][member] = hashlib.sha256((version_dir / member).read_bytes()).hexdigest()
    (version_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="unreadable"):
        CheckpointStore(store_copy).load()
    image = tmp_path / "x.png"
    image.write_bytes(generated_images()["rgb.png"][0])
    assert run_cli("predict", "--workdir", str(store_copy), str(image)) == 1
    assert run_cli("export", "--workdir", str(store_copy)) == 1
    assert "unreadable" in capsys.readouterr().err
    assert not marker.exists(), "a pickled object ran code while a checkpoint loaded"
    FIGURES.setdefault("weights_only_refused", []).append(member)


def _tamper(root: Path, source: str, name: str, how: str) -> None:
    shutil.copytree(root / source, root / name)
    model = root / name / "model.onnx"
    data = bytearray(model.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "append":
        data += b"\x00"
    model.write_bytes(bytes(data))
    manifest = json.loads((root / name / "manifest.json").read_text())
    manifest["name"] = name
    (root / name / "manifest.json").write_text(json.dumps(manifest))
    seal_bundle(root / name)  # the manifest itself stays sealed: what is refused is model.onnx


def test_tampered_bundles_are_refused_while_the_old_model_serves(store_copy: Path) -> None:
    root = store_copy / "bundles"
    good = (root / "CURRENT").read_text().strip()
    cases = {"v000080": "flip", "v000081": "truncate", "v000082": "append"}
    for name, how in cases.items():
        _tamper(root, good, name, how)
    settings = ServerSettings(workdir=store_copy, poll_interval_s=0.05)
    image = generated_images()["rgb.jpg"][0]
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/classify", content=image).json()["model_version"] == good
        for name in cases:
            write_pointer(root / "CURRENT", name)
            deadline = time.monotonic() + 5
            info: dict[str, Any] = {}
            while time.monotonic() < deadline:
                info = c.get("/v1/model").json()
                if info["last_reload_error"] and info["last_reload_error"]["bundle"].endswith(name):
                    break
                time.sleep(0.05)
            assert "sha256" in info["last_reload_error"]["error"], info
            assert info["model_version"] == good
            r = c.post("/v1/classify", content=image)
            assert r.status_code == 200 and r.json()["model_version"] == good
        expected = hashlib.sha256((root / good / "model.onnx").read_bytes()).hexdigest()
        assert info["manifest"]["model_sha256"] == expected
    # a server started on a tampered bundle never serves it: unready, every request 503
    with TestClient(create_app(ServerSettings(bundle=root / "v000080"))) as c:
        assert c.get("/v2/health/ready").status_code == 503
        r = c.post("/v1/classify", content=image)
        assert r.status_code == 503 and "sha256" in r.json()["error"]
    FIGURES["tampered_bundles_refused"] = sorted(cases.values())


def test_record_security_figures() -> None:
    """Runs last in this module: writes what the tests above measured."""
    assert FIGURES
    record("security", dict(FIGURES))
