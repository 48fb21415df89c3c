"""``cvm init`` and ``cvm update``: create a model store, learn a data folder into it and publish a new version
(the use case cvm_edge.update; after an update, deploy.export publishes the bundle)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cvm_edge.argtypes import experimental_group, mark_experimental, non_negative_float
from cvm_edge.cli.flagtypes import non_negative_int, plugin_list, positive_float, positive_int
from cvm_edge.errors import CvmError, UsageError

if TYPE_CHECKING:
    from cvm_edge.update import SavedUpdate, UpdateOptions

log = logging.getLogger("cvm")
Group = argparse._ArgumentGroup


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("init", help="create version 1 of a model store")
    store, model, learner = (i.add_argument_group(t) for t in ("store", "model", "learner"))
    _add_init_flags(store, model, learner)
    lab = experimental_group(i)
    _add_expert_flags(lab)
    mark_experimental(i, lab)
    i.set_defaults(func=cmd_init)

    u = sub.add_parser("update", help="learn the classes in a data folder and publish a new version")
    data, training, plugins, publishing, output = (
        u.add_argument_group(t) for t in ("data", "training", "plugins", "publishing", "output")
    )
    _add_update_training_flags(data, training, plugins)
    _add_plugin_flags(plugins)
    _add_publishing_flags(data, training, publishing, output)
    lab = experimental_group(u)
    _add_lab_plugin_flags(lab)
    mark_experimental(u, lab)
    u.set_defaults(func=cmd_update)


# ----- init -----------------------------------------------------------------------------------
def _add_init_flags(store: Group, model: Group, learner: Group) -> None:
    store.add_argument("--workdir", type=Path, required=True, help="store directory")
    store.add_argument("--concepts", type=Path, required=True, help="concept table (.npz)")
    model.add_argument(
        "--backbone", default=None, help="timm model name (default: pretrained efficientnet_lite0 when installed)"
    )
    model.add_argument("--image-size", type=positive_int, default=224, help="input size in pixels (default 224)")
    learner.add_argument(
        "--learner",
        choices=("analytic", "gradient"),
        default=None,
        help="analytic: closed-form ridge onto the concept rows on a frozen backbone, no images kept (default with a "
        "pretrained backbone); gradient: the training loop with replay and distillation (default from scratch)",
    )
    learner.add_argument(
        "--analytic-dim", type=positive_int, default=2048, help="analytic: width M of the random ReLU projection"
    )
    learner.add_argument(
        "--targets",
        choices=("whitened", "concepts", "onehot"),
        default="whitened",
        help="analytic: regress onto each class's row of the whitened concept table (default), its raw concept row, "
        "or one-hot (RanPAC)",
    )
    model.add_argument(
        "--train-backbone",
        choices=("all", "last", "none"),
        default=None,
        help="which backbone weights train (gradient learner; default all; the analytic learner needs none)",
    )
    model.add_argument(
        "--head", choices=("concepts", "linear"), default="concepts", help="concept table head or a plain linear one"
    )
    model.add_argument(
        "--mapper-hidden", type=non_negative_int, default=512, help="mapper hidden width; 0 = linear mapper"
    )
    model.add_argument("--pretrained", default=None, help="none | offline | hub | PATH to a timm-compatible checkpoint")
    learner.add_argument("--buffer-size", type=non_negative_int, default=500, help="replay buffer capacity (images)")
    learner.add_argument("--seed", type=int, default=0)
    store.add_argument(
        "--keep-versions",
        type=non_negative_int,
        default=5,
        help="keep the newest N versions (and their bundles) after each update; older ones are removed, never the "
        "current one nor the serving bundle's (default 5; 0 keeps all)",
    )
    model.add_argument(
        "--prototype-temperature",
        type=positive_float,
        default=0.1,
        help="T of the class score T*log(mean exp(cos/T)) over a class's prototypes (multi-prototype tables)",
    )


def _add_expert_flags(experts: Group) -> None:
    experts.add_argument(
        "--experts",
        choices=("none", "adapter"),
        default="none",
        help="adapter: each update adds a low-rank expert on the mapper, routed by feature anchors (default none)",
    )
    experts.add_argument("--expert-rank", type=positive_int, default=8, help="rank of each expert adapter (default 8)")
    experts.add_argument(
        "--expert-routing",
        dest="routing",
        choices=("soft", "hard"),
        default="soft",
        help="soft: softmax over anchor cosines; hard: top-1",
    )
    experts.add_argument(
        "--routing-temperature", type=positive_float, default=0.1, help="T of softmax(cos/T) for soft routing"
    )
    experts.add_argument(
        "--expert-shared-mapper",
        choices=("always", "first"),
        default="always",
        help="the shared mapper trains in every update (always) or with the first expert only (first)",
    )


def _backbone_and_learner(args: argparse.Namespace) -> tuple[str, str, str, str]:
    """(backbone, pretrained, learner, train_backbone): the flags, or their defaults, which depend on each other."""
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
    return backbone, pretrained, learner, train_backbone


def cmd_init(args: argparse.Namespace) -> int:
    from cvm_edge.update import InitOptions, init_store

    backbone, pretrained, learner, train_backbone = _backbone_and_learner(args)
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


# ----- update ---------------------------------------------------------------------------------
def _add_update_training_flags(data: Group, training: Group, plugins: Group) -> None:
    data.add_argument("--workdir", type=Path, required=True)
    data.add_argument(
        "--data", type=Path, required=True, help="one sub-folder per class (name or slug), or a labels.csv"
    )
    training.add_argument("--epochs", type=positive_int, default=5)
    training.add_argument("--batch-size", type=positive_int, default=32)
    training.add_argument("--lr", type=positive_float, default=1e-3)
    training.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    training.add_argument(
        "--buffer-size", type=non_negative_int, default=None, help="replay buffer capacity (default: keep)"
    )
    plugins.add_argument(
        "--plugins",
        type=plugin_list,
        default=("replay", "distill"),
        help="comma list of replay,distill,ewc,der or none; the lab's fusion and align need --experimental",
    )
    training.add_argument(
        "--loss",
        choices=("ace", "ce"),
        default="ace",
        help="ace: new images compete only among new classes, replayed ones among all (default); ce: plain",
    )
    training.add_argument(
        "--balance-epochs",
        type=non_negative_int,
        default=3,
        help="epochs of class-balanced head tuning on the replay buffer after training, with --optimizer at half --lr (0: off)",
    )


def _add_plugin_flags(plugins: Group) -> None:
    plugins.add_argument("--distill-weight", type=non_negative_float, default=1.0)
    plugins.add_argument("--distill-target", choices=("embedding", "logits"), default="embedding")
    plugins.add_argument("--ewc-lambda", type=non_negative_float, default=100.0)


def _add_lab_plugin_flags(lab: Group) -> None:
    lab.add_argument(
        "--align-weight",
        type=non_negative_float,
        default=1.0,
        help="align plugin: weight of 1 - cos(embedding, own class) on the incoming images (concept head only)",
    )
    lab.add_argument(
        "--similarity-scaling",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="P",
        help="scale distill weight and EWC lambda by clip((old-new cosine / table mean cosine)^P, 1/4, 4) "
        "(P defaults to 1 when the flag is given; 0: off)",
    )


def _add_publishing_flags(data: Group, training: Group, publishing: Group, output: Group) -> None:
    publishing.add_argument(
        "--max-forgetting", type=float, default=10.0, help="refuse to publish if old-class accuracy drops more (points)"
    )
    publishing.add_argument("--force", action="store_true", help="publish even past --max-forgetting")
    training.add_argument("--seed", type=int, default=0)
    data.add_argument("--holdout", type=float, default=0.2, help="validation fraction held out per class")
    data.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images with a warning instead of failing"
    )
    data.add_argument("--concepts", type=Path, default=None, help="an extended concept table (from `cvm embed extend`)")
    training.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    publishing.add_argument(
        "--no-export", action="store_true", help="do not export and publish an fp32 bundle afterwards"
    )
    publishing.add_argument(
        "--keep-versions",
        type=non_negative_int,
        default=None,
        help="change the store's setting: keep the newest N versions after this update (0: all; default: keep it)",
    )


def _update_options(args: argparse.Namespace) -> UpdateOptions:
    from cvm_edge.plugins import PluginOptions
    from cvm_edge.update import UpdateOptions

    return UpdateOptions(
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


def _export(workdir: Path, saved: SavedUpdate) -> str:
    """Export the new version's bundle (still under the update's lock); its summary line."""
    from cvm_edge.fsutil import fault_point
    from cvm_edge.memory import release_freed_memory
    from deploy.export import ON_DEVICE, export_bundle

    release_freed_memory()  # the update's images and models are gone: the peak is the bigger step's
    log.info("exporting the bundle of v%d", saved.version)
    fault_point("update_exporting")
    try:
        return export_bundle(workdir, saved.version, ON_DEVICE, images=saved.parity).summary()
    except CvmError as exc:
        raise CvmError(
            f"checkpoint v{saved.version} was saved, but no bundle was published ({exc}); the server keeps the "
            f"previous bundle. Retry with `cvm export --workdir {workdir}`"
        ) from None


def cmd_update(args: argparse.Namespace) -> int:
    # The command holds the store lock across the update and its export, so the use case never
    # calls into deploy: the layers stay one-way.
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.fsutil import FileLock
    from cvm_edge.update import finish_update, save_update

    opts = _update_options(args)
    store = CheckpointStore(args.workdir)
    with FileLock(store.lock_path, "cvm update"):
        saved = save_update(store, opts)
        exported = None if args.no_export else _export(args.workdir, saved)
        report = finish_update(store, saved)
    print(report.summary())
    if exported is not None:
        print(exported)
    return 0
