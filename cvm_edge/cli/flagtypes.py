"""Value types (argparse ``type=``) of the store commands' flags: a bad value is a usage error, exit 2."""

from __future__ import annotations

import argparse

from cvm_edge.argtypes import int_at_least

positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return v


def plugin_list(text: str) -> tuple[str, ...]:
    from cvm_edge.plugins import parse_plugin_list

    try:
        return tuple(parse_plugin_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
