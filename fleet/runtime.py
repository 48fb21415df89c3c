"""Flower's deployment runtime as processes: a SuperLink beside the coordinator's store, one
SuperNode per device store, and ``flwr run`` of the app in ``fleet/flwr_app``. These are the
commands a Flower user would type; ``cvm fleet`` only fills in the arguments."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from fleet import state as st
from fleet.settings import FleetSettings

CONNECTION = "cvm-fleet"


def _exe(name: str) -> str:
    """The Flower executable installed beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def superlink_argv(workdir: Path, host: str, port: int) -> list[str]:
    db = st.fleet_dir(workdir) / "superlink.db"
    return [
        _exe("flower-superlink"),
        "--insecure",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(db),
        "--disable-runtime-dependency-installation",
    ]


def supernode_argv(
    superlink: str, workdir: Path, data: Path | None, name: str, port: int, max_forgetting: float = 10.0
) -> list[str]:
    config = (
        f"workdir={_toml(str(Path(workdir).resolve()))} name={_toml(name)} max-forgetting={float(max_forgetting)!r}"
    )
    if data is not None:
        config += f" data={_toml(str(Path(data).resolve()))}"
    return [
        _exe("flower-supernode"),
        "--insecure",
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        config,
    ]


def _toml(value: str) -> str:
    """A TOML basic string (Flower parses --node-config values as TOML)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def flwr_home(workdir: Path, superlink: str) -> Path:
    """A Flower config home for ``flwr run`` that names the coordinator's SuperLink."""
    home = st.fleet_dir(workdir) / "flwr-run"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {_toml(superlink)}\ninsecure = true\n"
    )
    return home


def app_dir() -> Path:
    return Path(str(resources.files("fleet").joinpath("flwr_app")))


def run_argv(settings: FleetSettings) -> list[str]:
    cfg = {
        "workdir": _toml(str(settings.workdir.resolve())),
        "rounds": str(settings.rounds),
        "min-devices": str(settings.min_devices),
        "quorum": repr(float(settings.quorum)),
        "wire-dtype": _toml(settings.wire_dtype),
        "wait-s": repr(float(settings.wait_s)),
        "timeout-s": repr(float(settings.timeout_s)),
        "merge": _toml(settings.merge),
        "local-epochs": str(settings.local_epochs),
    }
    overrides = " ".join(f"{k}={v}" for k, v in cfg.items())
    return [_exe("flwr"), "run", str(app_dir()), CONNECTION, "--run-config", overrides, "--stream"]


def process_env(workdir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: they start their helpers (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name, so this Python's scripts folder goes first;
    Flower's own files (installed apps, config) go under the workdir, not the user's home."""
    env = dict(os.environ if base is None else base)
    home = st.fleet_dir(workdir) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env["FLWR_HOME"] = str(home.resolve())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # nothing leaves the machine: no telemetry,
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no version check
    return env


def run_env(workdir: Path, superlink: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = process_env(workdir, base)
    env["FLWR_HOME"] = str(flwr_home(workdir, superlink).resolve())
    return env


def shown(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
