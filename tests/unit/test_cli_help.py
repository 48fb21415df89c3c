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
        "--config",
        "--experimental",
        "experts",
        "expert_rank",
        "routing_temperature",
        "expert_shared_mapper",
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
        "--config",
        "align_weight",
        "similarity_scaling",
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


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("argv", "toml", "named"),
    [
        (["init", "--concepts", "t.npz"], 'experts = "adapter"\n', "experts is experimental"),
        (["init", "--concepts", "t.npz"], '[init]\nexpert_rank = 4\nrouting = "hard"\n', "expert_rank, routing are"),
        (["update", "--data", "d", "--plugins", "replay,align"], "", "align is experimental"),
        (
            ["update", "--data", "d", "--plugins", "fusion"],
            "similarity_scaling = 1.0\n",
            "similarity_scaling, fusion are",
        ),
        (["update", "--data", "d"], 'plugins = ["replay", "fusion"]\n', "fusion is experimental"),
        (["export", "--fusion-routing", "top-k"], "", "--fusion-routing is experimental"),
    ],
)
def test_the_labs_settings_need_the_experimental_switch(
    argv: list[str], toml: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lab method (cvm_edge/lab/) asked for without --experimental, by a flag or in the config
    file, is a usage error before anything runs."""
    wd = tmp_path / "w"
    config = ["--config", _toml(tmp_path, toml)] if toml else []
    assert run_cli(argv[0], "--workdir", str(wd), *argv[1:], *config) == 2
    err = capsys.readouterr().err
    assert named in err and "add --experimental" in err
    assert not wd.exists()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("epochs = 0\n", "epochs = 0: 0 must be at least 1"),
        ('optimizer = "rmsprop"\n', "is not one of adam, sgd"),
        ("lr = nan\n", "must be a finite number"),
        ("align_weight = -1\n", "must be a finite number >= 0"),
        ("epoch = 3\n", "unknown setting(s) epoch for cvm update"),
        ("epochs = [", "is not valid TOML"),
        ('plugins = "replay,fusion,der"\n', "fusion is data-free"),
        ('epochs = "7"\n', "is a string: write the value without quotes"),
        ("seed = 3\n[update]\nepochs = 2\n", "put every setting under [init] / [update], or none (seed is outside)"),
        ("holdout = 1.5\n", "must be at least 0 and below 1"),
        ("max_forgetting = nan\n", "is not a number"),
    ],
)
def test_a_bad_config_file_is_a_usage_error_that_names_the_setting(
    toml: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["update", "--workdir", str(tmp_path / "w"), "--data", "d", "--experimental"]
    assert run_cli(*argv, "--config", _toml(tmp_path, toml)) == 2
    assert message in capsys.readouterr().err


def test_a_flag_wins_over_the_config_file_and_the_file_over_the_default(tmp_path: Path) -> None:
    from cvm_edge import vocabulary
    from cvm_edge.cli import build_parser
    from cvm_edge.cli.learn import _update_options

    config = _toml(
        tmp_path,
        '[update]\nepochs = 9\nlr = 0.01\ndistill_target = "logits"\nplugins = "replay,ewc"\nmax_forgetting = inf\n'
        '[init]\ntargets = "onehot"\n',
    )
    args = build_parser().parse_args(["update", "--workdir", "w", "--data", "d", "--lr", "0.5", "--config", config])
    opts = _update_options(args)
    assert (opts.epochs, opts.lr, opts.plugins) == (9, 0.5, ("replay", "ewc"))
    assert opts.plugin_options.distill_target == "logits" and opts.max_forgetting == float("inf")
    assert vocabulary.read_config(Path(config), "init", vocabulary.INIT) == {"targets": "onehot"}
    assert opts.batch_size == vocabulary.UPDATE["batch_size"].default == 32
    plain = _update_options(build_parser().parse_args(["update", "--workdir", "w", "--data", "d"]))
    assert (plain.epochs, plain.lr, plain.plugins) == (5, 1e-3, ("replay", "distill"))


def test_the_defaults_need_no_switch_and_the_switch_shows_in_help() -> None:
    from cvm_edge.argtypes import lab_flags_used
    from cvm_edge.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "--workdir", "w"])
    assert lab_flags_used(args) == []
    args = parser.parse_args(["export", "--workdir", "w", "--experimental", "--fusion-routing", "top-k"])
    assert args.experimental and lab_flags_used(args) == ["--fusion-routing"]
    assert "experimental (the lab" in parser._subparsers._group_actions[0].choices["export"].format_help()  # type: ignore[union-attr]
