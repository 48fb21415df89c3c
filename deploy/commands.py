"""CLI subcommands of the deployment side (`cvm export`, `cvm serve`), registered by cvm_edge.cli."""

from __future__ import annotations

import argparse
from typing import Any


def add_deploy_commands(sub: Any) -> None:
    """Register the deployment subcommands on the ``cvm`` subparser collection."""
    _ = (sub, argparse)
