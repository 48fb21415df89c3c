"""Read class lists: ``.txt`` (one name a line) or ``.yaml`` (names with optional descriptions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cvm_edge.concepts import validate_names
from cvm_edge.errors import ConceptError, UsageError


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    name: str
    descriptions: tuple[str, ...] = ()


def _spec_from_yaml_item(item: Any, where: str) -> ClassSpec:
    if isinstance(item, str):
        return ClassSpec(item.strip())
    if isinstance(item, dict) and "name" in item:
        desc = item.get("descriptions") or []
        if not isinstance(desc, list) or not all(isinstance(d, str) and d.strip() for d in desc):
            raise ConceptError(f"{where}: descriptions of {item['name']!r} must be a list of non-empty strings")
        return ClassSpec(str(item["name"]).strip(), tuple(d.strip() for d in desc))
    raise ConceptError(f"{where}: expected a class name or a mapping with 'name' and 'descriptions', got {item!r}")


def read_class_file(path: Path) -> list[ClassSpec]:
    """Parse a class file. Blank lines and ``#`` comments in ``.txt`` files are ignored."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"class file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    specs: list[ClassSpec]
    if suffix == ".txt":
        specs = [
            ClassSpec(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConceptError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if data is None:
            data = []
        if isinstance(data, dict) and "classes" in data:
            data = data["classes"]
        if isinstance(data, dict):
            data = [{"name": k, "descriptions": v or []} for k, v in data.items()]
        if not isinstance(data, list):
            raise ConceptError(f"{path}: expected a list of classes")
        specs = [_spec_from_yaml_item(item, str(path)) for item in data]
    else:
        raise UsageError(f"class file {path} must end in .txt, .yaml or .yml")
    if not specs:
        raise ConceptError(f"class file {path} is empty")
    validate_names([s.name for s in specs])
    return specs
