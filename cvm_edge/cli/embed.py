"""``cvm embed build`` and ``cvm embed extend``: concept tables from a frozen language model (llm_embeddings)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cvm_edge.errors import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    embed = sub.add_parser("embed", help="build or extend a concept table with a frozen language model")
    esub = embed.add_subparsers(dest="embed_command", metavar="ACTION", required=True)
    _add_build(esub.add_parser("build", help="embed class names (and descriptions) into a new table"))
    _add_extend(esub.add_parser("extend", help="append classes to a table; existing rows stay bit-identical"))


def _add_build(b: argparse.ArgumentParser) -> None:
    classes = b.add_argument_group("classes")
    encoder = b.add_argument_group("encoder")
    output = b.add_argument_group("output")
    classes.add_argument(
        "--classes",
        type=Path,
        default=None,
        help=".txt (one name a line) or .yaml (names; inline descriptions are averaged into the name row)",
    )
    classes.add_argument(
        "--descriptions",
        default=None,
        help="YAML of class name -> list of descriptions, or a bundled set (cifar10, fashion_mnist, gtsrb, "
        "imagenette): each description becomes one more prototype row of its class; without --classes, "
        "its keys are the classes",
    )
    output.add_argument("--out", type=Path, required=True, help="table file to write (.npz)")
    encoder.add_argument(
        "--model", default=None, help="sentence-transformers name or local path (default: bundled all-MiniLM-L6-v2)"
    )
    encoder.add_argument(
        "--template", action="append", help="prompt template with {} for the name; repeat for an ensemble"
    )
    b.set_defaults(func=cmd_embed_build)


def _add_extend(e: argparse.ArgumentParser) -> None:
    table = e.add_argument_group("table")
    classes = e.add_argument_group("classes")
    encoder = e.add_argument_group("encoder")
    table.add_argument("--table", type=Path, required=True, help="existing table (.npz)")
    classes.add_argument("--classes", type=Path, default=None, help="new classes (.txt or .yaml)")
    classes.add_argument(
        "--descriptions",
        default=None,
        help="YAML of class name -> descriptions (or a bundled set) for the new classes' prototype rows; "
        "without --classes, the classes it names that the table lacks are appended",
    )
    table.add_argument("--out", type=Path, required=True, help="table file to write (may be the same as --table)")
    encoder.add_argument(
        "--model", default=None, help="must be the encoder the table was built with (default: bundled)"
    )
    e.set_defaults(func=cmd_embed_extend)


def _class_specs_and_descriptions(args: argparse.Namespace) -> tuple[list[Any], dict[str, tuple[str, ...]] | None]:
    """Classes from --classes, else the keys of --descriptions; --descriptions adds prototype rows."""
    from llm_embeddings.classfile import ClassSpec, read_class_file
    from llm_embeddings.descriptions import load_descriptions

    if args.classes is None and args.descriptions is None:
        raise UsageError("give --classes FILE, --descriptions FILE.yaml, or both")
    descriptions = load_descriptions(args.descriptions) if args.descriptions is not None else None
    if args.classes is not None:
        specs = read_class_file(args.classes)
    else:
        assert descriptions is not None
        specs = [ClassSpec(name) for name in descriptions]
    return specs, descriptions


def cmd_embed_build(args: argparse.Namespace) -> int:
    from llm_embeddings.build import DEFAULT_TEMPLATES, build_table
    from llm_embeddings.encoder import load_encoder

    specs, descriptions = _class_specs_and_descriptions(args)
    encoder = load_encoder(args.model)
    table = build_table(specs, encoder, tuple(args.template) if args.template else DEFAULT_TEMPLATES, descriptions)
    _warn_similar(table)
    table.save(args.out)
    print(
        f"wrote {args.out}: {len(table)} classes, {len(table.vectors)} prototype rows, {table.dim}-d, "
        f"encoder {table.encoder_id}, fingerprint {table.fingerprint}"
    )
    return 0


def cmd_embed_extend(args: argparse.Namespace) -> int:
    from cvm_edge.concepts import ConceptTable
    from llm_embeddings.build import extend_table
    from llm_embeddings.encoder import load_encoder

    table = ConceptTable.load(args.table)
    specs, descriptions = _class_specs_and_descriptions(args)
    if args.classes is None:  # descriptions alone: the classes they name that the table lacks
        specs = [s for s in specs if table.lookup(s.name) is None]
        if not specs:
            raise UsageError(f"every class in {args.descriptions} is already in {args.table}")
    encoder = load_encoder(args.model)
    new = extend_table(table, specs, encoder, descriptions)
    _warn_similar(new)
    new.save(args.out)
    print(f"wrote {args.out}: {len(table)} + {len(specs)} = {len(new)} classes, fingerprint {new.fingerprint}")
    return 0


def _warn_similar(table: object) -> None:
    from cvm_edge.concepts import ConceptTable

    assert isinstance(table, ConceptTable)
    for a, b, cos in table.similar_pairs():
        print(
            f"warning: classes {a!r} and {b!r} are very similar in the concept space (cosine {cos:.3f})",
            file=sys.stderr,
        )
