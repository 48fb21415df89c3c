from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = {
    (): ["embed", "init", "update", "status", "rollback", "predict"],
    ("embed", "build"): ["--classes", "--out", "--model", "--template"],
    ("embed", "extend"): ["--table", "--classes", "--out"],
    ("init",): [
        "--workdir",
        "--concepts",
        "--backbone",
        "--image-size",
        "--train-backbone",
        "--pretrained",
        "--experts",
        "--expert-rank",
        "--routing",
        "--routing-temperature",
        "--expert-shared-mapper",
    ],
    ("update",): [
        "--workdir",
        "--data",
        "--epochs",
        "--batch-size",
        "--lr",
        "--buffer-size",
        "--plugins",
        "--max-forgetting",
        "--force",
        "--seed",
        "--skip-bad-images",
        "--concepts",
    ],
    ("status",): ["--workdir", "--json"],
    ("rollback",): ["--workdir", "--to"],
    ("predict",): ["--workdir", "--top-k", "--json"],
}


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_describes_every_flag(cmd: tuple[str, ...]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cvm_edge.cli", *cmd, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in COMMANDS[cmd]:
        assert word in out, f"{word} missing from `cvm {' '.join(cmd)} --help`"


def test_console_script_installed() -> None:
    import shutil

    exe = shutil.which("cvm") or str(__import__("pathlib").Path(sys.executable).with_name("cvm"))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("cvm-edge ")
