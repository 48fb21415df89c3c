"""``cvm status`` and ``cvm rollback``: read a store's versions and history, make an older version current
(and point the server's bundle at it, deploy.bundle)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cvm_edge.display import printable


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("status", help="versions, classes and metrics history")
    s.add_argument_group("store").add_argument("--workdir", type=Path, required=True)
    output = s.add_argument_group("output")
    output.add_argument("--json", action="store_true")
    output.add_argument("--plot", type=Path, default=None, help="also write the accuracy matrix as a PNG")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("rollback", help="make an older version current")
    store = r.add_argument_group("store")
    store.add_argument("--workdir", type=Path, required=True)
    store.add_argument("--to", default=None, help="version (default: the current version's parent)")
    r.set_defaults(func=cmd_rollback)


# ----- status ---------------------------------------------------------------------------------
def _print_model(info: dict[str, Any]) -> None:
    """The model's lines of ``cvm status``: backbone, learner, backbone graph, what the store keeps."""
    m = info["model"]
    print(
        f"workdir {info['workdir']}: latest v{info['latest']}, backbone {m['backbone']} ({m['pretrained']}), head {m['head']}"
    )
    if m.get("learner") == "analytic":
        print(
            f"analytic learner: projection {m['analytic_dim']}, seed {m['analytic_seed']}, targets {m['analytic_targets']}"
        )
    graph = info["backbone_graph"]
    if graph is not None:
        size = (
            f"{graph['bytes'] / 1e6:.1f} MB"
            if graph["bytes"] is not None
            else "missing: the next update makes it again"
        )
        print(f"backbone graph {graph['sha256'][:12]} ({size}, one for all versions): updates run it without timm")
    keep = info["keep_versions"]
    print(
        f"keeps the newest {keep or 'all'} versions (--keep-versions), the current one and the serving bundle's; "
        f"kept now: {', '.join(f'v{v}' for v in info['kept_versions'])}"
    )


def cmd_status(args: argparse.Namespace) -> int:
    from cvm_edge.evaluate import accuracy_matrix, format_matrix
    from cvm_edge.update_report import describe_update, status

    info = status(args.workdir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_model(info)
    for v in info["versions"]:
        mark = "*" if v["latest"] else " "
        serving = "  serving" if v["serving"] else ""
        print(
            f" {mark} v{v['version']:<4} {v['created_at']}  {v['classes']} classes  parent {v['parent']}  "
            f"{v['bytes'] / 1e6:.1f} MB{serving}"
        )
    shown = ", ".join(printable(str(c)) for c in info["classes"])  # a name's ANSI escapes or newlines, escaped
    print(f"classes ({len(info['classes'])}): {shown or '(none yet)'}")
    for entry in info["history"]:
        print(f"  {describe_update(entry)}")
    if info["history"]:
        print(format_matrix(accuracy_matrix(info["history"]), "accuracy (%) per update's classes:"))
        if args.plot:
            from cvm_edge.plots import plot_accuracy_matrices

            plot_accuracy_matrices({str(args.workdir): accuracy_matrix(info["history"])}, args.plot)
            print(f"plot written to {args.plot}")
    return 0


# ----- rollback -------------------------------------------------------------------------------
def cmd_rollback(args: argparse.Namespace) -> int:
    from cvm_edge.checkpoints import CheckpointStore, parse_version
    from cvm_edge.fsutil import FileLock
    from deploy.bundle import latest_bundle_of, point_current, verify_bundle

    store = CheckpointStore(args.workdir)
    bundle: str | None = None

    def check_bundle(to: int) -> None:  # before LATEST moves: a bundle that fails its sha256 stops the rollback
        nonlocal bundle
        bundle = latest_bundle_of(args.workdir, to)
        if bundle is not None:
            verify_bundle(args.workdir, bundle)

    with FileLock(store.lock_path, "cvm rollback"):
        before = store.latest()
        to = store.rollback(parse_version(args.to) if args.to is not None else None, before_move=check_bundle)
        # The server follows the bundle pointer, so a rollback moves it too when that version was exported.
        if bundle is not None:
            point_current(args.workdir, bundle)
    print(f"rolled back {args.workdir}: v{before} -> v{to}")
    if bundle is not None:
        print(f"serving bundle is now {bundle}")
    else:
        print(f"v{to} has no exported bundle; run `cvm export --workdir {args.workdir}` to serve it")
    return 0
