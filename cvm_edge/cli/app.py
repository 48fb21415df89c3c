"""The ``cvm`` command: the parser assembly, logging and exit codes (2 usage errors, 1 failures, 130 interrupted).

The one place that wires the packages together; heavy imports (torch, sentence-transformers) happen inside
the command functions so ``--help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cvm_edge import __version__
from cvm_edge.argtypes import require_experimental
from cvm_edge.cli import embed, learn, predict, store
from cvm_edge.display import printable
from cvm_edge.errors import CvmError

# what the training and embedding extras install: a command that needs one of them on a slim install fails in one line
EXTRAS_MODULES = ("torch", "timm", "torchvision", "onnx", "sentence_transformers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvm", description="cvm-edge: continual visual mapping into a fixed language-model concept space."
    )
    parser.add_argument("--version", action="version", version=f"cvm-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    embed.register(sub)  # embed build, embed extend
    learn.register(sub)  # init, update
    store.register(sub)  # status, rollback
    predict.register(sub)  # predict
    _register_other_rooms(sub)  # inbox, export, serve, fleet
    return parser


def _register_other_rooms(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands other rooms own: ``cvm inbox`` (cvm_edge.inbox), ``cvm export|serve`` (deploy),
    ``cvm fleet`` (fleet)."""
    from cvm_edge.inbox import add_inbox_command
    from deploy.commands import add_deploy_commands  # torch-free: imports happen inside the commands

    add_inbox_command(sub)
    add_deploy_commands(sub)
    from fleet.commands import add_fleet_commands  # Flower and torch are imported inside the commands

    add_fleet_commands(sub)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 here
    _setup_logging(args.verbose, args.quiet)
    try:
        require_experimental(args)  # init and update check theirs with their config file (cvm_edge.vocabulary)
        return int(args.func(args))
    except CvmError as exc:  # one line: names and paths inside it cannot start another line or colour it
        print(f"cvm: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code  # 2 for a UsageError, 1 for every other CvmError
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in EXTRAS_MODULES:
            print(
                f"cvm: error: `cvm {args.command}` needs {exc.name}, which is not installed; "
                "install the training extras: pip install 'cvm-edge[train,embed]'",
                file=sys.stderr,
            )
            return 1
        raise
    except OSError as exc:  # a file system failure no command turned into a CvmError: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"cvm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except ValueError as exc:
        # os and pathlib refuse a path with a NUL byte (from a file such as labels.csv) this way
        if "embedded null byte" not in str(exc):
            raise
        print("cvm: error: a path given to this command contains a NUL byte; refused", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cvm: interrupted", file=sys.stderr)
        return 130
