from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

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
        "--expert-routing",
        "--routing-temperature",
        "--experimental",
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


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["init", "--concepts", "t.npz", "--experts", "adapter"], "--experts is experimental"),
        (
            ["init", "--concepts", "t.npz", "--expert-routing", "hard", "--expert-rank", "4"],
            "--expert-rank, --expert-routing are",
        ),
        (["update", "--data", "d", "--plugins", "replay,align"], "align is experimental"),
        (["update", "--data", "d", "--plugins", "fusion", "--similarity-scaling"], "--similarity-scaling, fusion are"),
        (["export", "--fusion-routing", "top-k"], "--fusion-routing is experimental"),
    ],
)
def test_the_labs_flags_need_the_experimental_switch(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lab method (cvm_edge/lab/) asked for without --experimental is a usage error, before anything runs."""
    wd = tmp_path / "w"
    assert run_cli(argv[0], "--workdir", str(wd), *argv[1:]) == 2
    err = capsys.readouterr().err
    assert named in err and "add --experimental" in err
    assert not wd.exists()


def test_the_defaults_need_no_switch_and_the_switch_shows_in_help() -> None:
    from cvm_edge.argtypes import lab_flags_used
    from cvm_edge.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["update", "--workdir", "w", "--data", "d", "--plugins", "replay,distill,ewc,der"])
    assert lab_flags_used(args, {"plugins": ("fusion", "align")}) == []
    args = parser.parse_args(["init", "--workdir", "w", "--concepts", "t", "--experimental", "--experts", "adapter"])
    assert args.experimental and lab_flags_used(args) == ["--experts"]
    assert "experimental (the lab" in parser._subparsers._group_actions[0].choices["export"].format_help()  # type: ignore[union-attr]
