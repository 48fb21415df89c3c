"""argparse value types shared by every `cvm` subcommand (torch-free)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cvm_edge.errors import UsageError


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``minimum`` (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return v

    return parse


# ----- the lab's flags ------------------------------------------------------------------------------
# Every command that reaches the lab (cvm_edge/lab/: methods that do not win by default) has an
# "experimental" argument group with the --experimental switch. Lab flags in it (cvm export
# --fusion-routing) are checked in `cvm`'s main, from what the command recorded in its parser's
# defaults; cvm init / update take their lab settings from --config and check them there
# (cvm_edge.vocabulary.lab_settings).
EXPERIMENTAL_TITLE = "experimental (the lab, cvm_edge/lab/: not a default anywhere; needs --experimental)"
LAB_KEY = "_lab_flags"  # parser default: {dest: (flag, default)}


def experimental_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The command's group of lab flags, with the ``--experimental`` switch itself."""
    group = parser.add_argument_group(EXPERIMENTAL_TITLE)
    group.add_argument(
        "--experimental",
        action="store_true",
        help="allow the lab's methods (bench/BENCHMARKS.md: none wins by default)",
    )
    return group


def mark_experimental(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> None:
    """Record the flags of ``group`` (but the switch) as the lab's: call after adding them."""
    flags = {a.dest: (a.option_strings[0], a.default) for a in group._group_actions if a.dest != "experimental"}
    parser.set_defaults(**{LAB_KEY: flags})


def lab_flags_used(args: argparse.Namespace) -> list[str]:
    """The lab flags ``args`` set away from their defaults."""
    return [flag for dest, (flag, default) in getattr(args, LAB_KEY, {}).items() if getattr(args, dest) != default]


def require_experimental(args: argparse.Namespace) -> None:
    """A usage error (exit 2) when ``args`` uses the lab without ``--experimental``."""
    used = lab_flags_used(args)
    if used and not getattr(args, "experimental", False):
        raise UsageError(
            f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} experimental (cvm_edge/lab/, not a default "
            "anywhere): add --experimental to use it"
        )
