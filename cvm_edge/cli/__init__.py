"""The ``cvm`` command, one module per command group:

- ``app``: the parser assembly, logging, the exit codes (2 usage errors, 1 failures) and the CvmError mapping;
- ``embed``: ``cvm embed build|extend`` (concept tables from a frozen language model);
- ``learn``: ``cvm init`` and ``cvm update`` (the use case ``cvm_edge.update``);
- ``store``: ``cvm status`` and ``cvm rollback``;
- ``predict``: ``cvm predict``;

``cvm inbox``, ``cvm export|serve`` and ``cvm fleet`` are registered by their own rooms (``cvm_edge.inbox``,
``deploy.commands``, ``fleet.commands``). The command line is the one room allowed to import ``deploy``,
``fleet`` and ``llm_embeddings`` (ARCHITECTURE.md); every such import, like torch's, happens inside a command
function, so importing this package and ``cvm --help`` stay light.
"""

from __future__ import annotations

from cvm_edge.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
