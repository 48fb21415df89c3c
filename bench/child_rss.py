"""Run a command and print its own peak RSS: ``python -m bench.child_rss CMD ...``.

A child's ``ru_maxrss`` includes the resident size of the process it was forked from: Linux keeps
the high-water mark across ``exec``. Measured from a harness that holds a dataset and torch (over
1 GB), every child "peaked" at least there. This launcher is a fresh interpreter that imports
nothing else, so the command it starts inherits only its few MB. It prints one JSON line on
stderr, ``{"rc": ..., "peak_rss_kb": ...}``, and exits with the command's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MARK = "CHILD_RSS "


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.child_rss CMD [ARG ...]", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv)
    _pid, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    print(MARK + json.dumps({"rc": rc, "peak_rss_kb": usage.ru_maxrss}), file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
