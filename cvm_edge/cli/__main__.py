"""``python -m cvm_edge.cli``: the ``cvm`` command."""

from __future__ import annotations

import sys

from cvm_edge.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
