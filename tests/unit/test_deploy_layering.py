"""ARCHITECTURE.md layering for deploy/: the serving modules never import torch or timm."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVING = ("deploy.bundle", "deploy.predictor", "deploy.server", "deploy.commands", "cvm_edge.cli")
HEAVY = ("torch", "timm", "torchvision", "sentence_transformers", "onnx")
# cvm_edge modules that import torch at module level
TORCH_SIDE = ("cvm_edge.checkpoints", "cvm_edge.model", "cvm_edge.update", "cvm_edge.strategy", "cvm_edge.backbones")


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        f"for m in {SERVING!r}: __import__(m)\n"
        "from deploy.server import ServerSettings, create_app\n"
        "from cvm_edge.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--workdir', '/nonexistent'])\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime" not in HEAVY


# deploy/server/ is a package: every module of it is checked
SERVING_SOURCES = [
    "bundle.py",
    "cpu.py",
    "predictor.py",
    *sorted(f"server/{p.name}" for p in (DEPLOY / "server").glob("*.py")),
    "commands.py",
]


@pytest.mark.parametrize("module", SERVING_SOURCES)
def test_no_torch_side_import_anywhere_in_serving_sources(module: str) -> None:
    """Static check, including imports inside functions (commands.py may import deploy.export
    only inside `cmd_export`, which runs the torch side on purpose)."""
    tree = ast.parse((DEPLOY / module).read_text())
    offenders = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in HEAVY or name in TORCH_SIDE or name == "deploy.export":
                offenders.append((name, node.lineno, id(node)))
    exempt = {
        id(n)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and fn.name == "cmd_export"
        for n in ast.walk(fn)
    }
    assert [(name, line) for name, line, node_id in offenders if node_id not in exempt] == []
