"""The configuration vocabulary of ``cvm init`` and ``cvm update``: every setting's name, default,
choices and validation, in one torch-free place.

The command line builds its flags from these terms, ``--config FILE.toml`` reads the same names,
the options (``InitOptions``, ``UpdateOptions``, ``PluginOptions``) and the stored config
(``ModelConfig``, checked whenever a version is read back) take their defaults and choice lists
from here. A value is checked once, by its term, whatever its source.

Precedence: a flag given on the command line, else the config file's value, else the default.
Terms marked ``lab`` belong to methods that do not win by default (cvm_edge/lab/): they are set
only in a config file, together with ``--experimental``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomllib

from cvm_edge.errors import UsageError

# ----- choice lists (the stored config and the options check against these) --------------------------------
LEARNERS = ("gradient", "analytic")
ANALYTIC_TARGETS = ("concepts", "whitened", "onehot")
TRAIN_BACKBONE = ("all", "last", "none")
HEADS = ("concepts", "linear")
EXPERTS = ("none", "adapter")
EXPERT_ROUTING = ("soft", "hard")
SHARED_MAPPER = ("always", "first")
OPTIMIZERS = ("adam", "sgd")
LOSSES = ("ace", "ce")  # the benchmarks' "ce-all" is not a product choice (strategy.LOSSES)
DISTILL_TARGETS = ("embedding", "logits")
PLUGINS = ("replay", "distill", "ewc", "der", "fusion", "align")
LAB_PLUGINS = ("fusion", "align")  # plugins of the lab: `cvm update --plugins` needs --experimental

DEFAULT_ANALYTIC_DIM = 2048
DEFAULT_BUFFER = 500
DEFAULT_KEEP_VERSIONS = 5
DEFAULT_PROTOTYPE_TEMPERATURE = 0.1
DEFAULT_ROUTING_TEMPERATURE = 0.1


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # the command line's default: "not given", so the file or the default decides


# ----- value checks: one message per kind, the same for a flag and a file ----------------------------------
def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None


def _number(value: Any) -> float:
    v = _float(value)
    if not math.isfinite(v):
        raise ValueError(f"{value!r} must be a finite number")
    return v


def _whole(minimum: int | None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or isinstance(value, float) or not isinstance(value, int | str):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if minimum is not None and v < minimum:
            raise ValueError(f"{value!r} must be at least {minimum}")
        return v

    return check


def _positive(value: Any) -> float:
    v = _number(value)
    if not v > 0:
        raise ValueError(f"{value!r} must be greater than 0")
    return v


def _non_negative(value: Any) -> float:
    """A loss weight: finite and >= 0 (nan and inf get this message too)."""
    v = _float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{value!r} must be a finite number >= 0")
    return v


def _points(value: Any) -> float:
    """A forgetting limit in points: any number but nan (inf turns the gate off without --force)."""
    v = _float(value)
    if math.isnan(v):
        raise ValueError(f"{value!r} is not a number")
    return v


def _fraction(value: Any) -> float:
    """A share held out: 0 <= v < 1."""
    v = _number(value)
    if not 0 <= v < 1:
        raise ValueError(f"{value!r} must be at least 0 and below 1")
    return v


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _plugins(value: Any) -> tuple[str, ...]:
    """``"replay,distill"`` or ``["replay", "distill"]``; ``"none"`` or empty: no plugins."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"{value!r} is not a list of plugins")
    names = [str(t).strip() for t in items if str(t).strip() and str(t).strip() != "none"]
    bad = [n for n in names if n not in PLUGINS]
    if bad:
        raise ValueError(f"unknown plugin(s) {', '.join(bad)}; choose from {', '.join(PLUGINS)} or none")
    if len(set(names)) != len(names):
        raise ValueError("a plugin is named twice")
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class Term:
    """One setting: its name (the config key, the options field, ``--name-with-dashes``)."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], Any] = _text
    choices: tuple[str, ...] | None = None
    lab: bool = False  # a lab method's setting: only in a config file, with --experimental

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, raw: Any, text: bool = True) -> Any:
        """``raw`` checked and converted; ValueError says why. ``text``: a flag's text, where a
        number comes as a string; in a TOML file a quoted number is a mistake worth naming."""
        if not text and isinstance(raw, str) and self.check not in (_text, _plugins):
            raise ValueError(f"{raw!r} is a string: write the value without quotes")
        v = self.check(raw)
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(self.choices)}")
        return v


def _terms(*terms: Term) -> dict[str, Term]:
    return {t.name: t for t in terms}


INIT = _terms(
    Term("backbone", None, "timm model name (default: pretrained efficientnet_lite0 when installed)"),
    Term("image_size", 224, "input size in pixels (default 224)", _whole(1)),
    Term(
        "learner",
        None,
        "analytic: closed-form ridge onto the concept rows on a frozen backbone, no images kept (default with a "
        "pretrained backbone); gradient: the training loop with replay and distillation (default from scratch)",
        choices=LEARNERS,
    ),
    Term("analytic_dim", DEFAULT_ANALYTIC_DIM, "analytic: width M of the random ReLU projection", _whole(1)),
    Term(
        "targets",
        "whitened",
        "analytic: regress onto each class's row of the whitened concept table (default), its raw concept row, "
        "or one-hot (RanPAC)",
        choices=ANALYTIC_TARGETS,
    ),
    Term(
        "train_backbone",
        None,
        "which backbone weights train (gradient learner; default all; the analytic learner needs none)",
        choices=TRAIN_BACKBONE,
    ),
    Term("head", "concepts", "concept table head or a plain linear one", choices=HEADS),
    Term("mapper_hidden", 512, "mapper hidden width; 0 = linear mapper", _whole(0)),
    Term("pretrained", None, "none | offline | hub | PATH to a timm-compatible checkpoint"),
    Term("buffer_size", DEFAULT_BUFFER, "replay buffer capacity (images)", _whole(0)),
    Term("seed", 0, "random seed", _whole(None)),
    Term(
        "keep_versions",
        DEFAULT_KEEP_VERSIONS,
        "keep the newest N versions (and their bundles) after each update; older ones are removed, never the "
        "current one nor the serving bundle's (default 5; 0 keeps all)",
        _whole(0),
    ),
    Term(
        "prototype_temperature",
        DEFAULT_PROTOTYPE_TEMPERATURE,
        "T of the class score T*log(mean exp(cos/T)) over a class's prototypes (multi-prototype tables)",
        _positive,
    ),
    Term(
        "experts",
        "none",
        "adapter: each update adds a low-rank expert on the mapper, routed by feature anchors",
        choices=EXPERTS,
        lab=True,
    ),
    Term("expert_rank", 8, "rank of each expert adapter", _whole(1), lab=True),
    Term(
        "routing",
        "soft",
        "experts: soft (softmax over anchor cosines) or hard (top-1)",
        choices=EXPERT_ROUTING,
        lab=True,
    ),
    Term("routing_temperature", DEFAULT_ROUTING_TEMPERATURE, "experts: T of softmax(cos/T)", _positive, lab=True),
    Term(
        "expert_shared_mapper",
        "always",
        "experts: the shared mapper trains in every update (always) or with the first expert only (first)",
        choices=SHARED_MAPPER,
        lab=True,
    ),
)

UPDATE = _terms(
    Term("epochs", 5, "passes over the new images", _whole(1)),
    Term("batch_size", 32, "images per step (and replayed images per step)", _whole(1)),
    Term("lr", 1e-3, "learning rate", _positive),
    Term("optimizer", "adam", "adam or sgd", choices=OPTIMIZERS),
    Term("buffer_size", None, "replay buffer capacity (default: keep)", _whole(0)),
    Term(
        "plugins",
        ("replay", "distill"),
        "comma list of replay,distill,ewc,der or none; the lab's fusion and align need --experimental",
        _plugins,
    ),
    Term(
        "loss",
        "ace",
        "ace: new images compete only among new classes, replayed ones among all (default); ce: plain",
        choices=LOSSES,
    ),
    Term(
        "balance_epochs",
        3,
        "epochs of class-balanced head tuning on the replay buffer after training, with --optimizer at half --lr (0: off)",
        _whole(0),
    ),
    Term("distill_weight", 1.0, "weight of the distillation term", _non_negative),
    Term("distill_target", "embedding", "distil the embedding or the old classes' logits", choices=DISTILL_TARGETS),
    Term("ewc_lambda", 100.0, "weight of the EWC penalty", _non_negative),
    Term("max_forgetting", 10.0, "refuse to publish if old-class accuracy drops more (points)", _points),
    Term("seed", 0, "random seed", _whole(None)),
    Term("holdout", 0.2, "validation fraction held out per class", _fraction),
    Term("device", "cpu", "torch device (cpu, cuda)"),
    Term(
        "keep_versions",
        None,
        "change the store's setting: keep the newest N versions after this update (0: all; default: keep it)",
        _whole(0),
    ),
    Term(
        "align_weight",
        1.0,
        "align plugin: weight of 1 - cos(embedding, own class) on the incoming images (concept head only)",
        _non_negative,
        lab=True,
    ),
    Term(
        "similarity_scaling",
        0.0,
        "scale distill weight and EWC lambda by clip((old-new cosine / table mean cosine)^P, 1/4, 4) (0: off)",
        _number,
        lab=True,
    ),
)


def read_config(path: Path, command: str, terms: Mapping[str, Term]) -> dict[str, Any]:
    """The settings of ``command`` in a TOML file: its top-level keys, or those of its ``[command]``
    table. Unknown keys and bad values are usage errors that name the file and the key."""
    try:
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc})") from None
    tables = [k for k in ("init", "update") if isinstance(data.get(k), dict)]
    flat = [k for k in data if k not in tables]
    if tables and flat:
        raise UsageError(f"{path}: put every setting under [init] / [update], or none ({', '.join(flat)} is outside)")
    section = data.get(command, {}) if tables else data
    unknown = sorted(set(section) - set(terms))
    if unknown:
        raise UsageError(
            f"{path}: unknown setting(s) {', '.join(unknown)} for cvm {command}; known: {', '.join(terms)}"
        )
    out = {}
    for key, raw in section.items():
        try:
            out[key] = terms[key].value(raw, text=False)
        except ValueError as exc:
            raise UsageError(f"{path}: {key} = {raw!r}: {exc}") from None
    return out


def resolve(terms: Mapping[str, Term], given: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Every term's value: given on the command line (not ``UNSET``), else the config file's, else its default."""
    out = {}
    for name, term in terms.items():
        v = given.get(name, UNSET)
        out[name] = v if v is not UNSET else config.get(name, term.default)
    return out


def lab_settings(terms: Mapping[str, Term], values: Mapping[str, Any]) -> list[str]:
    """The lab's settings that ``values`` moves away from their defaults, and the lab plugins it names."""
    used = [n for n, t in terms.items() if t.lab and values.get(n, t.default) != t.default]
    return used + [p for p in values.get("plugins", ()) if p in LAB_PLUGINS]
