"""ARCHITECTURE.md layering rules, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "cvm_edge.concepts",
        "cvm_edge.preprocess",
        "cvm_edge.fsutil",
        "cvm_edge.errors",
        "cvm_edge.cli",
        "cvm_edge.vocabulary",
        "cvm_edge.workdir",
        "cvm_edge.argtypes",
    ],
)
def test_light_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; bad = [m for m in ('torch', 'timm', 'sentence_transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cvm_edge_does_not_import_llm_embeddings() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "cvm_edge"
    cli = root / "cli"  # the package of the `cvm` command may import it
    offenders = [p.name for p in root.rglob("*.py") if "llm_embeddings" in p.read_text() and cli not in p.parents]
    assert offenders == []


@pytest.mark.parametrize("module", ["cvm_edge.checkpoints", "cvm_edge.model", "fleet.app"])
def test_reading_a_store_does_not_import_timm(module: str) -> None:
    """timm imports torchvision (~170 MB of RSS, seconds of CPU); only building a backbone needs it,
    and every fleet message runs in a fresh ClientApp process that mostly reads a store."""
    code = f"import sys, {module}; bad = [m for m in ('timm', 'torchvision') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
