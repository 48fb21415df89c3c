"""ARCHITECTURE.md's import rules between the rooms, checked on every source file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USE_CASES = ("cvm_edge.update", "cvm_edge.update_report")
BELOW_USE_CASES = ("learners", "gate", "strategy", "analytic_learner", "analytic", "loading", "model")
# The seams through which the spine reaches the lab (cvm_edge/lab/), each for one reason
# (ARCHITECTURE.md). Anything else that imports the lab is a lab method leaking into the spine.
LAB_SEAMS: dict[str, set[str]] = {
    "cvm_edge/model.py": {"cvm_edge.lab.experts"},  # ModelConfig.experts builds the experts' module
    "cvm_edge/strategy.py": {"cvm_edge.lab.experts"},  # a task's new expert before training
    "cvm_edge/update.py": {"cvm_edge.lab.similarity"},  # the task-similarity report
    "cvm_edge/update_report.py": {"cvm_edge.lab.similarity"},
    "cvm_edge/plugins/__init__.py": {"cvm_edge.lab.align", "cvm_edge.lab.fusion_plugin"},  # the plugin table
    "cvm_edge/plugins/distill.py": {"cvm_edge.lab.similarity"},  # the similarity_scaling setting
    "cvm_edge/plugins/ewc.py": {"cvm_edge.lab.similarity"},
    "deploy/export.py": {
        "cvm_edge.lab.fusion_state",
        "cvm_edge.lab.routing",
    },  # export --experimental --fusion-routing top-k
    "fleet/average.py": {"cvm_edge.lab.fusion"},  # the fleet's fusion merge
    "fleet/fused.py": {"cvm_edge.lab.fusion", "cvm_edge.lab.fusion_state", "cvm_edge.lab.routing"},
}
CLI = ROOT / "cvm_edge" / "cli"  # the package of the `cvm` command, the one room above all others


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions; not those under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for m in sorted(_imports(f)):
            if any(m == p or m.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(ROOT)} imports {m}")
    return bad


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("cvm_edge", ("deploy", "fleet", "llm_embeddings", "bench")),
        ("deploy", ("fleet", "bench")),
        ("fleet", ("bench",)),
        ("llm_embeddings", ("deploy", "fleet", "bench")),
    ],
)
def test_each_room_imports_only_the_rooms_below_it(room: str, forbidden: tuple[str, ...]) -> None:
    files = [f for f in (ROOT / room).rglob("*.py") if CLI not in f.parents]  # the command line: every room
    assert files
    assert _offenders(files, forbidden) == []


def test_learners_and_models_never_import_the_use_cases() -> None:
    files = [ROOT / "cvm_edge" / f"{name}.py" for name in BELOW_USE_CASES]
    assert _offenders(files, USE_CASES) == []


def test_the_spine_reaches_the_lab_only_through_its_seams() -> None:
    lab_dir = ROOT / "cvm_edge" / "lab"
    spine = [
        f
        for room in ("cvm_edge", "deploy", "fleet", "llm_embeddings")
        for f in (ROOT / room).rglob("*.py")
        if lab_dir not in f.parents
    ]
    bad = []
    for f in spine:
        if CLI in f.parents:  # the command line reaches everything, the lab behind --experimental
            continue
        rel = f.relative_to(ROOT).as_posix()
        lab = {".".join(m.split(".")[:3]) for m in _imports(f) if m.startswith("cvm_edge.lab.")}
        bad += [f"{rel} imports {m}" for m in sorted(lab - LAB_SEAMS.get(rel, set()))]
    assert bad == []


def test_the_check_sees_imports_inside_functions_and_ignores_annotation_only_ones(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from cvm_edge.update import UpdateOptions\n"
        "def g():\n    from deploy.export import export_bundle\n"
    )
    got = _imports(f)
    assert "deploy.export" in got and "cvm_edge.update" not in got
