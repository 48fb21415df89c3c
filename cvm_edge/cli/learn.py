"""``cvm init`` and ``cvm update``: create a model store, learn a data folder into it and publish a new version
(the use case cvm_edge.update; after an update, deploy.export publishes the bundle)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvm_edge import vocabulary
from cvm_edge.argtypes import experimental_group
from cvm_edge.errors import CvmError, UsageError

if TYPE_CHECKING:
    from cvm_edge.update import SavedUpdate, UpdateOptions

log = logging.getLogger("cvm")
Group = argparse._ArgumentGroup


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("init", help="create version 1 of a model store")
    store, model, learner = (i.add_argument_group(t) for t in ("store", "model", "learner"))
    store.add_argument("--workdir", type=Path, required=True, help="store directory")
    store.add_argument("--concepts", type=Path, required=True, help="concept table (.npz)")
    _add_terms(
        vocabulary.INIT,
        {
            "keep_versions": store,
            "learner": learner,
            "analytic_dim": learner,
            "targets": learner,
            "buffer_size": learner,
            "seed": learner,
        },
        model,
    )
    _add_config_flags(i, vocabulary.INIT)
    i.set_defaults(func=cmd_init)

    u = sub.add_parser("update", help="learn the classes in a data folder and publish a new version")
    data, training, plugins, publishing, output = (
        u.add_argument_group(t) for t in ("data", "training", "plugins", "publishing", "output")
    )
    data.add_argument("--workdir", type=Path, required=True)
    data.add_argument(
        "--data", type=Path, required=True, help="one sub-folder per class (name or slug), or a labels.csv"
    )
    plugin_terms = ("plugins", "distill_weight", "distill_target", "ewc_lambda")
    placed = {n: plugins for n in plugin_terms} | {"max_forgetting": publishing, "keep_versions": publishing}
    _add_terms(vocabulary.UPDATE, placed | {"holdout": data}, training)
    publishing.add_argument("--force", action="store_true", help="publish even past --max-forgetting")
    publishing.add_argument(
        "--no-export", action="store_true", help="do not export and publish an fp32 bundle afterwards"
    )
    data.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images with a warning instead of failing"
    )
    data.add_argument("--concepts", type=Path, default=None, help="an extended concept table (from `cvm embed extend`)")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(u, vocabulary.UPDATE)
    u.set_defaults(func=cmd_update)


def _add_terms(terms: dict[str, vocabulary.Term], groups: dict[str, Group], default_group: Group) -> None:
    """A flag per term of the vocabulary but the lab's (those are config-file settings); its value
    is checked by the term, and left UNSET when not given so the config file can decide."""
    for name, term in terms.items():
        if term.lab:
            continue
        group = groups.get(name, default_group)
        metavar = "{" + ",".join(term.choices) + "}" if term.choices else None
        group.add_argument(
            term.flag, dest=name, type=_flag_type(term), default=vocabulary.UNSET, metavar=metavar, help=_help(term)
        )


def _flag_type(term: vocabulary.Term) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return term.value(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _help(term: vocabulary.Term) -> str:
    default = "" if term.default is None or "default" in term.help else f" (default {_shown(term.default)})"
    return f"{term.help}{default}"


def _shown(value: object) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser, terms: dict[str, vocabulary.Term]) -> None:
    experimental_group(parser)
    lab_names = ", ".join(n for n, t in terms.items() if t.lab)
    parser.add_argument_group("config").add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.toml",
        help="settings by name (the flags' names with underscores, top level or under [init] / [update]); a flag "
        f"on the command line wins over the file. The lab's settings ({lab_names}) are set only here, with "
        "--experimental",
    )


def _settings(args: argparse.Namespace, command: str, terms: dict[str, vocabulary.Term]) -> dict[str, Any]:
    """Every setting of ``command``: the flags, else the config file, else the defaults; the lab's need --experimental."""
    config = vocabulary.read_config(args.config, command, terms) if args.config else {}
    values = vocabulary.resolve(terms, vars(args), config)
    lab = vocabulary.lab_settings(terms, values)
    if lab and not args.experimental:
        raise UsageError(
            f"{', '.join(lab)} {'is' if len(lab) == 1 else 'are'} experimental (cvm_edge/lab/, not a default "
            "anywhere): add --experimental to use it"
        )
    return values


def _backbone_and_learner(v: dict[str, Any]) -> tuple[str, str, str, str]:
    """(backbone, pretrained, learner, train_backbone): the settings, or their defaults, which depend on each other."""
    pretrained = v["pretrained"]
    backbone = v["backbone"]
    if backbone is None:
        from cvm_edge.pretrained import default_backbone

        backbone, default_pretrained = default_backbone()
        pretrained = pretrained or default_pretrained
    pretrained = pretrained or "none"
    # The analytic learner needs features worth projecting: the default on a pretrained backbone
    # (bench/BENCHMARKS.md: above every gradient method there); from scratch the backbone must learn.
    learner = v["learner"] or ("analytic" if pretrained != "none" else "gradient")
    train_backbone = v["train_backbone"] or ("none" if learner == "analytic" else "all")
    if learner == "analytic" and train_backbone != "none":
        raise UsageError(
            "the analytic learner keeps the backbone frozen: use --train-backbone none or --learner gradient"
        )
    return backbone, pretrained, learner, train_backbone


def cmd_init(args: argparse.Namespace) -> int:
    from cvm_edge.update import InitOptions, init_store

    v = _settings(args, "init", vocabulary.INIT)
    backbone, pretrained, learner, train_backbone = _backbone_and_learner(v)
    resolved = {"backbone": backbone, "pretrained": pretrained, "learner": learner, "train_backbone": train_backbone}
    resolved["analytic_targets"] = v.pop("targets")  # the option's name says which learner it is for
    opts = InitOptions(concepts=args.concepts, **(v | resolved))
    version = init_store(args.workdir, opts)
    print(
        f"initialised {args.workdir}: version {version}, backbone {backbone} ({opts.pretrained}), "
        f"{opts.image_size} px, {learner} learner"
    )
    return 0


# ----- update ---------------------------------------------------------------------------------
_PLUGIN_SETTINGS = ("distill_weight", "distill_target", "ewc_lambda", "similarity_scaling", "align_weight")


def _update_options(args: argparse.Namespace) -> UpdateOptions:
    from cvm_edge.plugins import PluginOptions, parse_plugin_list
    from cvm_edge.update import UpdateOptions

    v = _settings(args, "update", vocabulary.UPDATE)
    try:
        plugins = tuple(parse_plugin_list(",".join(v.pop("plugins"))))  # the combinations the plugins refuse
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    plugin_options = PluginOptions(**{k: v.pop(k) for k in _PLUGIN_SETTINGS})
    return UpdateOptions(
        data_dir=args.data,
        plugins=plugins,
        plugin_options=plugin_options,
        force=args.force,
        skip_bad_images=args.skip_bad_images,
        concepts=args.concepts,
        progress=not args.no_progress,
        **v,
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
        saved = save_update(store, opts, export_follows=not args.no_export)
        exported = None if args.no_export else _export(args.workdir, saved)
        report = finish_update(store, saved)
    print(report.summary())
    if exported is not None:
        print(exported)
    return 0
