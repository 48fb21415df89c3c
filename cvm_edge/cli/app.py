"""The ``cvm`` command. The one place that wires the packages together; heavy imports
(torch, sentence-transformers) happen inside the command functions so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvm_edge import __version__
from cvm_edge.argtypes import int_at_least, non_negative_float
from cvm_edge.display import printable
from cvm_edge.errors import CvmError, UsageError

log = logging.getLogger("cvm")


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return v


def _plugin_list(text: str) -> tuple[str, ...]:
    from cvm_edge.plugins import parse_plugin_list

    try:
        return tuple(parse_plugin_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ----- embed --------------------------------------------------------------------------------
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


# ----- store ----------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from cvm_edge.update import InitOptions, init_store

    pretrained = args.pretrained
    backbone = args.backbone
    if backbone is None:
        from cvm_edge.defaults import default_backbone

        backbone, default_pretrained = default_backbone()
        pretrained = pretrained or default_pretrained
    pretrained = pretrained or "none"
    # The analytic learner needs features worth projecting: the default on a pretrained backbone
    # (bench/BENCHMARKS.md: above every gradient method there); from scratch the backbone must learn.
    learner = args.learner or ("analytic" if pretrained != "none" else "gradient")
    train_backbone = args.train_backbone or ("none" if learner == "analytic" else "all")
    if learner == "analytic" and train_backbone != "none":
        raise UsageError(
            "the analytic learner keeps the backbone frozen: use --train-backbone none or --learner gradient"
        )
    opts = InitOptions(
        concepts=args.concepts,
        backbone=backbone,
        image_size=args.image_size,
        train_backbone=train_backbone,
        head=args.head,
        mapper_hidden=args.mapper_hidden,
        pretrained=pretrained,
        buffer_size=args.buffer_size,
        seed=args.seed,
        prototype_temperature=args.prototype_temperature,
        experts=args.experts,
        expert_rank=args.expert_rank,
        routing=args.routing,
        routing_temperature=args.routing_temperature,
        expert_shared_mapper=args.expert_shared_mapper,
        learner=learner,
        analytic_dim=args.analytic_dim,
        analytic_targets=args.targets,
        keep_versions=args.keep_versions,
    )
    version = init_store(args.workdir, opts)
    print(
        f"initialised {args.workdir}: version {version}, backbone {backbone} ({opts.pretrained}), {args.image_size} px, "
        f"{learner} learner"
    )
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from cvm_edge.plugins import PluginOptions
    from cvm_edge.update import UpdateOptions, run_update

    opts = UpdateOptions(
        data_dir=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        buffer_size=args.buffer_size,
        plugins=args.plugins,
        plugin_options=PluginOptions(
            distill_weight=args.distill_weight,
            distill_target=args.distill_target,
            ewc_lambda=args.ewc_lambda,
            similarity_scaling=args.similarity_scaling,
            align_weight=args.align_weight,
        ),
        max_forgetting=args.max_forgetting,
        force=args.force,
        seed=args.seed,
        holdout=args.holdout,
        skip_bad_images=args.skip_bad_images,
        concepts=args.concepts,
        device=args.device,
        progress=not args.no_progress,
        loss=args.loss,
        balance_epochs=args.balance_epochs,
        keep_versions=args.keep_versions,
    )
    exported: list[str] = []

    def export_hook(version: int, images: Any) -> None:  # inside run_update's lock, after the checkpoint is saved
        from cvm_edge.fsutil import fault_point
        from deploy.export import ON_DEVICE, export_bundle

        log.info("exporting the bundle of v%d", version)
        fault_point("update_exporting")
        try:
            exported.append(export_bundle(args.workdir, version, ON_DEVICE, images=images).summary())
        except CvmError as exc:
            raise CvmError(
                f"checkpoint v{version} was saved, but no bundle was published ({exc}); the server keeps the "
                f"previous bundle. Retry with `cvm export --workdir {args.workdir}`"
            ) from None

    report = run_update(args.workdir, opts, publish_hook=None if args.no_export else export_hook)
    print(report.summary())
    for line in exported:
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cvm_edge.evaluate import accuracy_matrix, format_matrix
    from cvm_edge.update_report import describe_update, status

    info = status(args.workdir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
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


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from cvm_edge.analytic_learner import logit_scale
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.fsutil import MAX_IMAGE_BYTES, read_regular
    from cvm_edge.loading import graph_to_run, head_from_checkpoint, model_from_checkpoint
    from cvm_edge.preprocess import load_pixels
    from cvm_edge.strategy import predict_logits

    ckpt = CheckpointStore(args.workdir).load(ridge_statistics=False)  # an analytic store's sums are not needed
    if not ckpt.seen:
        raise UsageError("the model has not learned any class yet; run `cvm update` first")
    pixels = []
    for path in args.images:
        try:
            pixels.append(load_pixels(read_regular(Path(path), MAX_IMAGE_BYTES), ckpt.prep))  # no FIFO, no 2 GB file
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    graph = graph_to_run(ckpt)
    if graph is not None:
        # the store's backbone graph in onnxruntime and the head in torch: no timm module is built
        import torch

        from cvm_edge.frozen_features import GraphFeatures

        model = head_from_checkpoint(ckpt)
        features = GraphFeatures(graph, ckpt.prep)(np.stack(pixels))
        with torch.inference_mode():
            logits = model(torch.from_numpy(features)).numpy()
    else:
        model = model_from_checkpoint(ckpt)
        logits = predict_logits(model, ckpt.prep, np.stack(pixels))
    seen = np.asarray(ckpt.seen)
    sub = logits[:, seen]
    probs = np.exp(sub - sub.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    # Analytic stores calibrate an unknown threshold on their held-out images (the best class score,
    # logits / logit scale, of ~95 % of known images is above it): below it the image is flagged.
    threshold = ckpt.history[-1].get("unknown_threshold") if ckpt.history else None
    best = sub.max(axis=1) / logit_scale(model) if threshold is not None else sub.max(axis=1)
    k = min(args.top_k, len(seen))
    results: list[dict[str, Any]] = []
    for path, p, b in zip(args.images, probs, best, strict=True):
        top = np.argsort(-p)[:k]
        result: dict[str, Any] = {
            "image": str(path),
            "predictions": [{"label": ckpt.table.names[seen[i]], "score": round(float(p[i]), 6)} for i in top],
        }
        if threshold is not None:
            result.update(unknown=bool(b < threshold), best_score=round(float(b), 6), unknown_threshold=threshold)
        results.append(result)
    if args.json:
        print(json.dumps({"model_version": ckpt.version, "results": results}, indent=2))
    else:
        for r in results:
            preds = ", ".join(f"{printable(q['label'])} {q['score']:.3f}" for q in r["predictions"])
            flag = (
                f" [unknown: best score {r['best_score']:.3f} < {r['unknown_threshold']:.3f}]"
                if r.get("unknown")
                else ""
            )
            print(f"{printable(r['image'])}: {preds}{flag}")
    return 0


# ----- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvm", description="cvm-edge: continual visual mapping into a fixed language-model concept space."
    )
    parser.add_argument("--version", action="version", version=f"cvm-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    embed = sub.add_parser("embed", help="build or extend a concept table with a frozen language model")
    esub = embed.add_subparsers(dest="embed_command", metavar="ACTION", required=True)
    b = esub.add_parser("build", help="embed class names (and descriptions) into a new table")
    b.add_argument(
        "--classes",
        type=Path,
        default=None,
        help=".txt (one name a line) or .yaml (names; inline descriptions are averaged into the name row)",
    )
    b.add_argument(
        "--descriptions",
        default=None,
        help="YAML of class name -> list of descriptions, or a bundled set (cifar10, fashion_mnist, gtsrb, "
        "imagenette): each description becomes one more prototype row of its class; without --classes, "
        "its keys are the classes",
    )
    b.add_argument("--out", type=Path, required=True, help="table file to write (.npz)")
    b.add_argument(
        "--model", default=None, help="sentence-transformers name or local path (default: bundled all-MiniLM-L6-v2)"
    )
    b.add_argument("--template", action="append", help="prompt template with {} for the name; repeat for an ensemble")
    b.set_defaults(func=cmd_embed_build)
    e = esub.add_parser("extend", help="append classes to a table; existing rows stay bit-identical")
    e.add_argument("--table", type=Path, required=True, help="existing table (.npz)")
    e.add_argument("--classes", type=Path, default=None, help="new classes (.txt or .yaml)")
    e.add_argument(
        "--descriptions",
        default=None,
        help="YAML of class name -> descriptions (or a bundled set) for the new classes' prototype rows; "
        "without --classes, the classes it names that the table lacks are appended",
    )
    e.add_argument("--out", type=Path, required=True, help="table file to write (may be the same as --table)")
    e.add_argument("--model", default=None, help="must be the encoder the table was built with (default: bundled)")
    e.set_defaults(func=cmd_embed_extend)

    i = sub.add_parser("init", help="create version 1 of a model store")
    i.add_argument("--workdir", type=Path, required=True, help="store directory")
    i.add_argument("--concepts", type=Path, required=True, help="concept table (.npz)")
    i.add_argument(
        "--backbone", default=None, help="timm model name (default: pretrained efficientnet_lite0 when installed)"
    )
    i.add_argument("--image-size", type=_positive_int, default=224, help="input size in pixels (default 224)")
    i.add_argument(
        "--learner",
        choices=("analytic", "gradient"),
        default=None,
        help="analytic: closed-form ridge onto the concept rows on a frozen backbone, no images kept (default with a "
        "pretrained backbone); gradient: the training loop with replay and distillation (default from scratch)",
    )
    i.add_argument(
        "--analytic-dim", type=_positive_int, default=2048, help="analytic: width M of the random ReLU projection"
    )
    i.add_argument(
        "--targets",
        choices=("whitened", "concepts", "onehot"),
        default="whitened",
        help="analytic: regress onto each class's row of the whitened concept table (default), its raw concept row, "
        "or one-hot (RanPAC)",
    )
    i.add_argument(
        "--train-backbone",
        choices=("all", "last", "none"),
        default=None,
        help="which backbone weights train (gradient learner; default all; the analytic learner needs none)",
    )
    i.add_argument(
        "--head", choices=("concepts", "linear"), default="concepts", help="concept table head or a plain linear one"
    )
    i.add_argument(
        "--mapper-hidden", type=_non_negative_int, default=512, help="mapper hidden width; 0 = linear mapper"
    )
    i.add_argument("--pretrained", default=None, help="none | offline | hub | PATH to a timm-compatible checkpoint")
    i.add_argument("--buffer-size", type=_non_negative_int, default=500, help="replay buffer capacity (images)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument(
        "--keep-versions",
        type=_non_negative_int,
        default=5,
        help="keep the newest N versions (and their bundles) after each update; older ones are removed, never the "
        "current one nor the serving bundle's (default 5; 0 keeps all)",
    )
    i.add_argument(
        "--prototype-temperature",
        type=_positive_float,
        default=0.1,
        help="T of the class score T*log(mean exp(cos/T)) over a class's prototypes (multi-prototype tables)",
    )
    i.add_argument(
        "--experts",
        choices=("none", "adapter"),
        default="none",
        help="adapter: each update adds a low-rank expert on the mapper, routed by feature anchors (default none)",
    )
    i.add_argument("--expert-rank", type=_positive_int, default=8, help="rank of each expert adapter (default 8)")
    i.add_argument(
        "--routing", choices=("soft", "hard"), default="soft", help="soft: softmax over anchor cosines; hard: top-1"
    )
    i.add_argument(
        "--routing-temperature", type=_positive_float, default=0.1, help="T of softmax(cos/T) for soft routing"
    )
    i.add_argument(
        "--expert-shared-mapper",
        choices=("always", "first"),
        default="always",
        help="the shared mapper trains in every update (always) or with the first expert only (first)",
    )
    i.set_defaults(func=cmd_init)

    u = sub.add_parser("update", help="learn the classes in a data folder and publish a new version")
    u.add_argument("--workdir", type=Path, required=True)
    u.add_argument("--data", type=Path, required=True, help="one sub-folder per class (name or slug), or a labels.csv")
    u.add_argument("--epochs", type=_positive_int, default=5)
    u.add_argument("--batch-size", type=_positive_int, default=32)
    u.add_argument("--lr", type=_positive_float, default=1e-3)
    u.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    u.add_argument("--buffer-size", type=_non_negative_int, default=None, help="replay buffer capacity (default: keep)")
    u.add_argument(
        "--plugins",
        type=_plugin_list,
        default=("replay", "distill"),
        help="comma list of replay,distill,ewc,der,fusion,align or none",
    )
    u.add_argument(
        "--loss",
        choices=("ace", "ce"),
        default="ace",
        help="ace: new images compete only among new classes, replayed ones among all (default); ce: plain",
    )
    u.add_argument(
        "--balance-epochs",
        type=_non_negative_int,
        default=3,
        help="epochs of class-balanced head tuning on the replay buffer after training, with --optimizer at half --lr (0: off)",
    )
    u.add_argument("--distill-weight", type=non_negative_float, default=1.0)
    u.add_argument("--distill-target", choices=("embedding", "logits"), default="embedding")
    u.add_argument("--ewc-lambda", type=non_negative_float, default=100.0)
    u.add_argument(
        "--align-weight",
        type=non_negative_float,
        default=1.0,
        help="align plugin: weight of 1 - cos(embedding, own class) on the incoming images (concept head only)",
    )
    u.add_argument(
        "--similarity-scaling",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="P",
        help="scale distill weight and EWC lambda by clip((old-new cosine / table mean cosine)^P, 1/4, 4) "
        "(P defaults to 1 when the flag is given; 0: off)",
    )
    u.add_argument(
        "--max-forgetting", type=float, default=10.0, help="refuse to publish if old-class accuracy drops more (points)"
    )
    u.add_argument("--force", action="store_true", help="publish even past --max-forgetting")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--holdout", type=float, default=0.2, help="validation fraction held out per class")
    u.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images with a warning instead of failing"
    )
    u.add_argument("--concepts", type=Path, default=None, help="an extended concept table (from `cvm embed extend`)")
    u.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    u.add_argument("--no-progress", action="store_true", help="no progress bars")
    u.add_argument("--no-export", action="store_true", help="do not export and publish an fp32 bundle afterwards")
    u.add_argument(
        "--keep-versions",
        type=_non_negative_int,
        default=None,
        help="change the store's setting: keep the newest N versions after this update (0: all; default: keep it)",
    )
    u.set_defaults(func=cmd_update)

    s = sub.add_parser("status", help="versions, classes and metrics history")
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", type=Path, default=None, help="also write the accuracy matrix as a PNG")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("rollback", help="make an older version current")
    r.add_argument("--workdir", type=Path, required=True)
    r.add_argument("--to", default=None, help="version (default: the current version's parent)")
    r.set_defaults(func=cmd_rollback)

    p = sub.add_parser("predict", help="classify image files with the current version")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=_positive_int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    from cvm_edge.inbox import add_inbox_command
    from deploy.commands import add_deploy_commands  # torch-free: imports happen inside the commands

    add_inbox_command(sub)
    add_deploy_commands(sub)
    from fleet.commands import add_fleet_commands  # Flower and torch are imported inside the commands

    add_fleet_commands(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"cvm: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except CvmError as exc:  # one line: names and paths inside it cannot start another line or colour it
        print(f"cvm: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "timm", "torchvision", "onnx", "sentence_transformers"):
            print(
                f"cvm: error: `cvm {args.command}` needs {exc.name}, which is not installed; "
                "install the training extras: pip install 'cvm-edge[train,embed]'",
                file=sys.stderr,
            )
            return 1
        raise
    except OSError as exc:  # a file system failure no command turned into a CvmError: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"cvm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except ValueError as exc:
        # os and pathlib refuse a path with a NUL byte (from a file such as labels.csv) this way
        if "embedded null byte" not in str(exc):
            raise
        print("cvm: error: a path given to this command contains a NUL byte; refused", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cvm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
