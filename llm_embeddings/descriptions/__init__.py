"""Class descriptions for multi-prototype concept tables (``cvm embed build --descriptions``).

A descriptions file is YAML mapping a class name to a list of short visual descriptions; each
description becomes one extra prototype row of its class. Curated sets for the benchmark
datasets ship here as package data (``cifar10``, ``fashion_mnist``, ``gtsrb``, ``imagenette``);
their keys are the datasets' ``classes.json`` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from cvm_edge.concepts import slugify
from cvm_edge.errors import ConceptError, UsageError

BUNDLED = ("cifar10", "fashion_mnist", "gtsrb", "imagenette")

Descriptions = dict[str, tuple[str, ...]]


def parse_descriptions(text: str, where: str) -> Descriptions:
    """``name: [description, ...]`` YAML -> ordered dict of stripped descriptions."""
    import yaml

    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConceptError(f"{where}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ConceptError(f"{where}: expected a mapping of class name -> list of descriptions")
    out: Descriptions = {}
    for name, texts in data.items():
        if not isinstance(name, str):
            # YAML reads unquoted No/Yes/On/Off/numbers as non-strings; say how to keep the name.
            raise ConceptError(f"{where}: class name {name!r} is not a string; quote it")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConceptError(f"{where}: descriptions of {name!r} must be a non-empty list of non-empty strings")
        out[name.strip()] = tuple(t.strip() for t in texts)
    return out


def bundled(name: str) -> Descriptions:
    """One of the curated sets in :data:`BUNDLED`."""
    if name not in BUNDLED:
        raise UsageError(f"no bundled descriptions named {name!r}; bundled: {', '.join(BUNDLED)}")
    text = (resources.files(__name__) / f"{name}.yaml").read_text(encoding="utf-8")
    return parse_descriptions(text, f"bundled descriptions {name}")


def load_descriptions(path_or_name: str | Path) -> Descriptions:
    """A descriptions file, or the name of a bundled set when no such file exists."""
    path = Path(path_or_name)
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise UsageError(f"descriptions file {path} must end in .yaml or .yml")
        return parse_descriptions(path.read_text(encoding="utf-8"), str(path))
    if str(path_or_name) in BUNDLED:
        return bundled(str(path_or_name))
    raise UsageError(f"descriptions file {path} does not exist (bundled sets: {', '.join(BUNDLED)})")


def bundled_descriptions_for(names: Iterable[str]) -> Descriptions:
    """Descriptions of ``names`` from every bundled set (the benchmark class names are unique
    across the datasets, so multi-dataset protocols work too); names without any are left out."""
    everything: Descriptions = {}
    for set_name in BUNDLED:
        everything.update(bundled(set_name))
    wanted = set(names)
    return {k: v for k, v in everything.items() if k in wanted}


def match_descriptions(
    names: Sequence[str], descriptions: Mapping[str, Sequence[str]]
) -> tuple[list[tuple[str, ...]], list[str]]:
    """(descriptions per name, in ``names`` order; keys that match no name). Keys match a class by
    exact name or by slug, as data folders do."""
    by_slug = {slugify(n): n for n in names}
    per_name: dict[str, tuple[str, ...]] = {}
    unmatched = []
    for key, texts in descriptions.items():
        name = key if key in by_slug.values() else by_slug.get(slugify(key))
        if name is None:
            unmatched.append(key)
        elif name in per_name:
            raise ConceptError(f"class {name!r} has two description entries ({key!r} and another)")
        else:
            per_name[name] = tuple(texts)
    return [per_name.get(n, ()) for n in names], unmatched
