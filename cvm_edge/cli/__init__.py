"""The ``cvm`` command (``cvm_edge.cli:main``, ``python -m cvm_edge.cli``)."""

from __future__ import annotations

from cvm_edge.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
