"""One benchmark run: a method on a class- or domain-incremental protocol, trained through the
product's Strategy and plugins, evaluated after every task, written as one JSON file.

    python -m bench.run --protocol cifar10-5 --method derpp --buffer 200 --seed 0 --device cuda
    python -m bench.run --protocol cifar10-5 --smoke        # CPU smoke: 2 tasks, 1 epoch, small subset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import resource
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import provenance
from bench.datasets import REPO, Split, data_root
from bench.domains import apply_domain
from bench.mammoth import preprocessing, reset_to_torch_defaults
from bench.methods import METHODS, Method
from bench.metrics import forgetting_per_task, summarise
from bench.protocols import PROTOCOLS, Protocol, Scenario, build_scenario
from bench.reservoir import ReservoirDerPlugin, ReservoirPlugin, ReservoirReplayPlugin
from bench.speed import speed_backend
from bench.tables import concept_vectors, dummy_vectors
from cvm_edge import vocabulary
from cvm_edge.buffer import ReplayBuffer
from cvm_edge.data import ImageSet
from cvm_edge.evaluate import predict_classes
from cvm_edge.lab.experts import ExpertMixture
from cvm_edge.lab.routing import FusedRoutedModel
from cvm_edge.model import CvmModel, ModelConfig, build_model
from cvm_edge.plugins import DistillPlugin, EwcPlugin, FusionPlugin, PluginOptions, make_plugins
from cvm_edge.preprocess import Preprocessing
from cvm_edge.strategy import Plugin, Strategy, TrainConfig
from cvm_edge.trainer_backend import TrainerBackend

log = logging.getLogger("bench.run")

RESULTS = REPO / "bench" / "results"
SMOKE_METHODS = ("finetune", "er", "derpp", "cvm-er-distill")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    protocol: Protocol
    method: Method
    buffer: int
    seed: int
    device: str = "cpu"
    epochs: int | None = None
    n_tasks: int | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    use_demo: bool = False
    image_size: int | None = None
    backbone: str | None = None
    pretrained: str | None = None
    train_backbone: str | None = None
    channels_last: bool = True
    amp_bf16: bool = False
    compile_mode: str = ""
    cuda_graph: bool = False
    tag: str = ""
    # (key, value) pairs that replace the method's resolved hyper-parameters (--hp): a sweep
    # without a new method per value; recorded in the result's hyperparameters.overrides.
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def size(self) -> int:
        return self.image_size or self.protocol.image_size

    @property
    def run_name(self) -> str:
        b = self.buffer if self.method.uses_buffer else 0
        return f"{self.method.name}{self.tag}-b{b}-s{self.seed}"


def versions() -> dict[str, str | None]:
    """Library versions (bench.provenance) plus the CUDA and cuDNN that torch was built with."""
    return {
        **provenance.versions(),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
    }


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {**provenance.machine(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _model(spec: RunSpec, scenario: Scenario) -> tuple[CvmModel, Preprocessing, ModelConfig, str]:
    backbone_name = spec.backbone or spec.protocol.backbone
    pretrained = spec.pretrained or spec.protocol.pretrained
    table_fp = "none (linear head)"
    if spec.method.head == "concepts":
        table, table_fp = concept_vectors(scenario.class_names, spec.method.prototypes)
    else:
        table = dummy_vectors(len(scenario.class_names))
    backbone = None
    prep = preprocessing(spec.size, spec.method.input_norm)
    if pretrained != "none":
        from cvm_edge.pretrained import load_pretrained_backbone

        backbone, prep, backbone_name = load_pretrained_backbone(backbone_name, pretrained, spec.size)
    config = ModelConfig(
        backbone=backbone_name,
        image_size=spec.size,
        train_backbone=spec.train_backbone or spec.protocol.train_backbone,
        head=spec.method.head,
        pretrained=pretrained,
        **spec.method.model_options,
    )
    model = build_model(config, table, pretrained_backbone=backbone)
    if spec.method.init == "torch":
        if pretrained != "none":
            raise ValueError(f"{spec.method.name} re-initialises its model: it cannot start from pretrained weights")
        reset_to_torch_defaults(model)
    return model, prep, config, table_fp


def _similarity_factors(plugins: Sequence[Plugin]) -> dict[str, float]:
    """This task's task-similarity factor per scaling plugin (``cvm-simscale``), e.g.
    ``{"distill_similarity_factor": 1.12}``; empty when no plugin scales."""
    return {
        f"{p.name}_similarity_factor": round(p.factor, 4)
        for p in plugins
        if isinstance(p, DistillPlugin | EwcPlugin) and p.similarity_scaling
    }


def equal_memory_capacity(buffer: int, expert_bytes: int, sample_bytes: int) -> int:
    """Buffer capacity once ``expert_bytes`` are counted against a buffer of ``buffer`` samples of
    ``sample_bytes`` each: every started sample's worth of expert bytes costs one sample."""
    return max(0, buffer - math.ceil(expert_bytes / sample_bytes))


def _task_data(split_images: np.ndarray, split_labels: np.ndarray, classes: Sequence[int]) -> ImageSet:
    mask = np.isin(split_labels, np.asarray(classes))
    return ImageSet(split_images[mask], split_labels[mask])


def _domain_set(split: Split, name: str, index: int, part: str) -> ImageSet:
    return ImageSet(apply_domain(name, split.images, index, part), split.labels)


def _train_data(scenario: Scenario, t: int, classes: Sequence[int], joint: bool, size: int) -> ImageSet:
    """Task ``t``'s training images: its classes, or (domain-incremental) every class in domain ``t``;
    joint training takes every domain at once."""
    if not scenario.domains:
        return _task_data(scenario.train.images, scenario.train.labels, classes)
    which = range(len(scenario.domains)) if joint else [t]
    return ImageSet.concat([_domain_set(scenario.train, scenario.domains[k], k, "train") for k in which], size)


def _test_sets(scenario: Scenario) -> list[ImageSet]:
    """Task j's test set: its classes, or (domain-incremental) every class in domain j."""
    test = scenario.test
    if scenario.domains:
        return [_domain_set(test, name, j, "test") for j, name in enumerate(scenario.domains)]
    return [_task_data(test.images, test.labels, tj) for tj in scenario.tasks]


def _domain_shift_figures(scenario: Scenario, tests: Sequence[ImageSet]) -> list[dict[str, Any]]:
    """How far each domain's test images are from the clean ones (mean |difference|, 0-255): the
    record shows the shift was really applied (a greyscale shift of already-grey images gives 0)."""
    clean = scenario.test.images.astype(np.int16)
    return [
        {"domain": name, "test_mean_abs_diff": round(float(np.abs(t.pixels.astype(np.int16) - clean).mean()), 3)}
        for name, t in zip(scenario.domains, tests, strict=True)
    ]


# Fusion methods train once and are scored three ways (evaluation only, so the comparison of
# unified versus routed costs no second training run): name -> top-k (0: the unified model).
FUSION_VARIANTS = {"unified": 0, "top1": 1, "top2": 2}


def _scored_models(
    model: torch.nn.Module, method: Method, fusion: FusionPlugin | None
) -> tuple[dict[str, torch.nn.Module], str]:
    """The models a method is scored with, by name, and the name of the one its own figures use."""
    if fusion is None:
        return {method.name: model}, method.name
    if fusion.state is None:
        raise ValueError(f"{method.name} has no fusion state after training")
    own = f"top{method.routed_k}" if method.routed_k else "unified"
    ks = {**FUSION_VARIANTS, own: method.routed_k}
    # One set of rebuilt task models serves every k (T + 1 model copies, not one set per variant).
    routed = FusedRoutedModel(model, fusion.state, max(ks.values()), method.routed_combine)  # type: ignore[arg-type]
    return {name: model if k == 0 else routed.with_k(k) for name, k in ks.items()}, own


def _accuracy_row(
    model: torch.nn.Module,
    prep: Preprocessing,
    test_sets: Sequence[ImageSet],
    n_eval: int,
    seen: list[int],
    device: torch.device,
) -> list[float | None]:
    """Accuracy (percent) on each of the first ``n_eval`` test sets (tasks or domains), None after them."""
    row: list[float | None] = []
    for j, test in enumerate(test_sets):
        if j >= n_eval:
            row.append(None)
            continue
        pred = predict_classes(model, prep, test.pixels, seen, device)
        row.append(round(100.0 * float((pred == test.labels).mean()), 3))
    return row


def stored_bytes(
    buffer: ReplayBuffer | ReservoirPlugin, fusion: FusionPlugin | None, experts: ExpertMixture | None = None
) -> dict[str, Any]:
    """What a method keeps between tasks besides the shared model, in bytes (equal-memory
    comparisons): buffer images, fusion deltas and masks, per-task experts."""
    fused = fusion.state.nbytes().to_dict() if fusion is not None and fusion.state is not None else None
    expert_bytes = 0 if experts is None else experts.nbytes
    total = buffer.nbytes + (fused["total"] if fused else 0) + expert_bytes
    return {"buffer": buffer.nbytes, "fusion": fused, "experts": expert_bytes, "total": total}


def make_run_plugins(spec: RunSpec, hp: dict[str, Any]) -> list[Plugin]:
    """The product's plugins of a method, or a benchmark-only reservoir DER++ / ER (bench.reservoir)."""
    plugins = spec.method.plugins
    if "der-reservoir" in plugins or "replay-reservoir" in plugins:
        if len(plugins) != 1:
            raise ValueError(f"{plugins[0]} runs alone")
        if plugins == ("replay-reservoir",):
            return [ReservoirReplayPlugin(spec.buffer)]
        return [ReservoirDerPlugin(spec.buffer, hp["der_alpha"], hp["der_beta"], hp.get("der_passes", 1))]
    return make_plugins(spec.method.plugins, spec.method.plugin_options(hp))


def run_backend(spec: RunSpec) -> TrainerBackend:
    """How the run's steps execute: the product's eager float32 unless the spec asks for speed-ups."""
    return speed_backend(spec.device, spec.amp_bf16, spec.compile_mode, spec.cuda_graph)


def train_config(spec: RunSpec, hp: dict[str, Any], epochs: int) -> TrainConfig:
    """The Strategy's configuration for a run: the protocol's batch, the method's resolved
    hyper-parameters ``hp``, the run's device and step options."""
    return TrainConfig(
        epochs=epochs,
        batch_size=spec.protocol.batch_size,
        replay_batch_size=spec.protocol.batch_size,
        lr=hp["lr"],
        optimizer=hp["optimizer"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        augment=True,
        crop_pad=max(1, spec.size // 8),
        crop_pad_black=spec.method.input_norm == "cifar10",
        seed=spec.seed,
        device=spec.device,
        progress=False,
        loss=hp["loss"],
        balance_epochs=hp["balance_epochs"],
        channels_last=spec.channels_last,
    )


def run(spec: RunSpec, out_dir: Path, argv: Sequence[str] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    scenario = build_scenario(
        spec.protocol,
        spec.seed,
        image_size=spec.size,
        n_tasks=spec.n_tasks,
        train_per_class=spec.train_per_class,
        test_per_class=spec.test_per_class,
        use_demo=spec.use_demo,
    )
    t_data = time.perf_counter() - t_start
    torch.manual_seed(spec.seed)
    if spec.method.learner != "gradient":
        return _run_frozen(spec, scenario, out_dir, argv, t_start)
    model, prep, model_config, table_fp = _model(spec, scenario)
    hp = {**spec.method.resolved(spec.buffer), **dict(spec.overrides)}
    epochs = spec.epochs or spec.protocol.epochs
    plugins = make_run_plugins(spec, hp)
    fusion = next((p for p in plugins if isinstance(p, FusionPlugin)), None)
    reservoir = next((p for p in plugins if isinstance(p, ReservoirPlugin)), None)
    base_cfg = train_config(spec, hp, epochs)
    backend = run_backend(spec)
    tasks = [tuple(sorted({c for t in scenario.tasks for c in t}))] if spec.method.joint else list(scenario.tasks)
    test_sets = _test_sets(scenario)
    # (a reservoir method keeps its own buffer: the product's stays empty)
    capacity = spec.buffer if spec.method.uses_buffer and reservoir is None else 0
    buffer = ReplayBuffer.empty(capacity, spec.size, max_bytes=1 << 30)
    matrix: list[list[float | None]] = []
    variant_matrices: dict[str, list[list[float | None]]] = {}
    per_task: list[dict[str, Any]] = []
    seen: list[int] = []
    images_seen, train_s, eval_s = 0, 0.0, 0.0
    experts = model.experts
    sample_bytes = buffer.sample_bytes(len(scenario.class_names))
    for t, classes in enumerate(tasks):
        old = list(seen)
        seen = sorted(set(seen) | set(classes))
        data = _train_data(scenario, t, classes, spec.method.joint, spec.size)
        if spec.method.equal_memory and experts is not None:
            # The experts after this task (known before it: one more, the class map over max(seen)+1
            # rows) take the place of buffer samples; the buffer is cut to that at the task's end.
            after = experts.nbytes_for(len(experts) + 1, max(seen) + 1)
            buffer = dataclasses.replace(buffer, capacity=equal_memory_capacity(spec.buffer, after, sample_bytes))
        cfg = dataclasses.replace(base_cfg, seed=spec.seed * 1000 + t)
        strategy = Strategy(model, prep, plugins, cfg, backend)
        t0 = time.perf_counter()
        result = strategy.train_experience(data, buffer, seen, old, task_index=t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt_train = time.perf_counter() - t0
        buffer = result.buffer
        # what the method replays from: the product's buffer, or the reservoir it keeps instead
        replay: ReplayBuffer | ReservoirPlugin = buffer if reservoir is None else reservoir
        t0 = time.perf_counter()
        scored, own = _scored_models(model, spec.method, fusion)
        # Class-incremental: only the tasks learned so far. Domain-incremental: every domain, also
        # those not trained yet (all classes are known from the first task on).
        n_eval = len(scenario.tasks) if spec.method.joint or scenario.domains else t + 1
        rows = {name: _accuracy_row(m, prep, test_sets, n_eval, seen, device) for name, m in scored.items()}
        row = rows[own]
        for name, r in rows.items():
            variant_matrices.setdefault(name, []).append(r)
        routing = None if experts is None or not len(experts) else _routing_row(strategy, experts, test_sets, n_eval)
        dt_eval = time.perf_counter() - t0
        matrix.append(row)
        images_seen += result.images_seen
        train_s += dt_train
        eval_s += dt_eval
        per_task.append(
            {
                "task": t,
                "classes": list(classes),
                "n_train": len(data),
                "train_s": round(dt_train, 3),
                "eval_s": round(dt_eval, 3),
                "steps": result.steps,
                "images_seen": result.images_seen,
                "final_loss": None if math.isnan(result.final_loss) else round(result.final_loss, 5),
                "buffer_size": len(replay),
                # entries per task that brought them: a domain-incremental buffer keeps every domain
                "buffer_by_task": {str(k): v for k, v in sorted(Counter(buffer.tasks.tolist()).items())},
                "buffer_capacity": replay.capacity,
                "buffer_bytes": replay.nbytes,
                "expert_bytes": 0 if experts is None else experts.nbytes,
                **({"routing_acc": routing} if routing is not None else {}),
                **({"fusion": fusion.reports[-1]} if fusion is not None else {}),
                **_similarity_factors(plugins),
            }
        )
        del scored
        log.info("%s task %d: %s (train %.1fs)", spec.run_name, t, row, dt_train)
    wall = time.perf_counter() - t_start
    if spec.method.joint:
        summary: dict[str, float | None] = {
            "final_avg_acc": float(np.mean([v for v in matrix[-1] if v is not None])),
            "avg_incremental_acc": None,
            "forgetting": None,
            "bwt": None,
        }
    else:
        summary = summarise(matrix)
    peak: dict[str, float] = {"rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        peak["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    record: dict[str, Any] = {
        "protocol": spec.protocol.name,
        "method": spec.method.name,
        "method_description": spec.method.description,
        "buffer": spec.buffer if spec.method.uses_buffer else 0,
        "seed": spec.seed,
        "tag": spec.tag,
        **{k: (None if v is None else round(v, 3)) for k, v in summary.items()},
        "acc_matrix": matrix,
        "forgetting_per_task": None if spec.method.joint else forgetting_per_task(matrix),
        "tasks": [list(t) for t in scenario.tasks],
        "domains": list(scenario.domains),
        "domain_shift": _domain_shift_figures(scenario, test_sets) if scenario.domains else None,
        "class_names": list(scenario.class_names),
        "datasets": list(scenario.sources),
        "n_train": len(scenario.train),
        "n_test": len(scenario.test),
        "wall_s": round(wall, 2),
        "data_s": round(t_data, 2),
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "images_seen": images_seen,
        "images_per_s": round(images_seen / max(train_s, 1e-9), 1),
        "peak_memory": peak,
        # Memory that persists between tasks: replay buffer and experts (equal-memory comparisons).
        "buffer_bytes": replay.nbytes,
        "expert_bytes": 0 if experts is None else experts.nbytes,
        "experts": None
        if experts is None
        else _experts_record(spec, model_config, experts, sample_bytes, per_task[-1].get("routing_acc")),
        "stored_bytes": stored_bytes(replay, fusion, experts),
        **(
            {
                "fusion_variants": {
                    name: {"acc_matrix": m, **{k: None if v is None else round(v, 3) for k, v in summarise(m).items()}}
                    for name, m in variant_matrices.items()
                }
            }
            if fusion is not None
            else {}
        ),
        "per_task": per_task,
        "hyperparameters": {
            "epochs": epochs,
            "batch_size": base_cfg.batch_size,
            "replay_batch_size": base_cfg.replay_batch_size,
            "crop_pad": base_cfg.crop_pad,
            "augment": "random crop ({} pad) + horizontal flip, on the training device".format(
                "black" if base_cfg.crop_pad_black else "zero (normalised)"
            ),
            "init": spec.method.init,
            "channels_last": spec.channels_last,
            "amp_bf16": spec.amp_bf16,
            "compile_mode": spec.compile_mode,
            "cuda_graph": spec.cuda_graph,
            "plugins": list(spec.method.plugins),
            **hp,
            "overrides": dict(spec.overrides),
            "model": model_config.to_dict(),
            "preprocessing": prep.to_dict(),
            "concept_table": table_fp,
            "prototypes": "name + bundled descriptions" if spec.method.prototypes else "name",
            "train_per_class": spec.train_per_class,
            "test_per_class": spec.test_per_class,
            "buffer_policy": (
                "reservoir sampling (algorithm R) while the stream passes, logits recorded at insertion, "
                "replayed from the first step (bench.reservoir)"
                if reservoir is not None
                else "class-balanced, a class's quota split evenly over the tasks that brought it "
                "(its domains), rebalanced at the end of each task (not reservoir sampling)"
            ),
            **(
                {
                    "routing": {
                        "top_k": spec.method.routed_k,
                        "combine": spec.method.routed_combine,
                        "features": "base backbone, centred cosine",
                    }
                }
                if spec.method.routed_k
                else {}
            ),
        },
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else ["python", "-m", "bench.run"])),
        "git_commit": provenance.git_commit(),
        "machine": machine(spec.device),
        "device": spec.device,
        "versions": versions(),
        "date": provenance.utc_now(),
        "data_root": str(data_root()) if not spec.use_demo else "cvm_edge/demo_data (embedded sample)",
    }
    return _write(record, out_dir, spec.run_name)


def _write(record: dict[str, Any], out_dir: Path, name: str) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    record["path"] = str(path)
    return record


def _run_frozen(
    spec: RunSpec, scenario: Scenario, out_dir: Path, argv: Sequence[str] | None, t_start: float
) -> dict[str, Any]:
    """A frozen-feature method (bench.frozen) on the protocol's pretrained backbone."""
    from bench.frozen import record_fields, run_frozen
    from cvm_edge.pretrained import load_pretrained_backbone

    pretrained = spec.pretrained or spec.protocol.pretrained
    if pretrained == "none":
        raise SystemExit(f"{spec.method.name} needs a pretrained backbone (--pretrained offline)")
    backbone, prep, name = load_pretrained_backbone(spec.backbone or spec.protocol.backbone, pretrained, spec.size)
    hp = {**spec.method.resolved(spec.buffer), **dict(spec.overrides)}
    result = run_frozen(spec, scenario, backbone, name, prep, hp)
    record: dict[str, Any] = {
        "protocol": spec.protocol.name,
        "method": spec.method.name,
        "method_description": spec.method.description,
        "buffer": 0,
        "seed": spec.seed,
        "tag": spec.tag,
        "image_size": spec.size,
        "backbone": name,
        "tasks": [list(t) for t in scenario.tasks],
        "class_names": list(scenario.class_names),
        "datasets": list(scenario.sources),
        "n_train": len(scenario.train),
        "n_test": len(scenario.test),
        **record_fields(
            spec,
            result,
            time.perf_counter() - t_start,
            argv if argv is not None else ["python", "-m", "bench.run"],
            machine(spec.device),
            versions(),
            hp,
            prep,
            peak_rss_mb(),
        ),
    }
    return _write(record, out_dir, spec.run_name)


@torch.no_grad()
def _routing_row(
    strategy: Strategy, experts: ExpertMixture, test_sets: Sequence[ImageSet], n_eval: int
) -> list[float | None]:
    """Percent of each test set (tasks learned so far) whose largest routing weight goes to the
    expert of the image's class: how often the anchors pick the right expert at inference."""
    row: list[float | None] = []
    for j, test in enumerate(test_sets):
        if j >= n_eval:
            row.append(None)
            continue
        chosen = experts.route(strategy.features(test.pixels).float()).argmax(dim=-1)
        truth = experts.experts_of(torch.from_numpy(test.labels).to(chosen.device))
        row.append(round(100.0 * float((chosen == truth).float().mean()), 3))
    return row


def _experts_record(
    spec: RunSpec, config: ModelConfig, experts: ExpertMixture, sample_bytes: int, routing: list[float | None] | None
) -> dict[str, Any]:
    done = [r for r in routing or [] if r is not None]
    return {
        "count": len(experts),
        "shared_mapper": config.expert_shared_mapper,
        "rank": experts.rank,
        "routing": experts.routing,
        "routing_temperature": experts.temperature,
        "bytes": experts.nbytes,
        "buffer_sample_bytes": sample_bytes,
        "bytes_in_buffer_samples": math.ceil(experts.nbytes / sample_bytes),
        "equal_memory": spec.method.equal_memory,
        # after the last task: per task's test set, and their mean (percent routed to the right expert)
        "routing_acc": routing,
        "routing_acc_mean": round(sum(done) / len(done), 3) if done else None,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    ap.add_argument("--method", default=None, help=f"one or a comma list of {', '.join(METHODS)} (default: all)")
    ap.add_argument("--buffer", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the protocol's)")
    ap.add_argument("--tasks", type=int, default=None, help="stop after this many tasks")
    ap.add_argument("--train-per-class", type=int, default=None)
    ap.add_argument("--test-per-class", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--pretrained", default=None, choices=("none", "offline"))
    ap.add_argument("--train-backbone", default=None, choices=vocabulary.TRAIN_BACKBONE)
    ap.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC model and inputs"
    )
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", default="", metavar="MODE", help="torch.compile the backbone (e.g. reduce-overhead)")
    ap.add_argument(
        "--cuda-graph", action="store_true", help="replay each full training step from one CUDA graph (GPU)"
    )
    ap.add_argument("--tag", default="", help="suffix for the result file name (variants of one method)")
    ap.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace one of the method's hyper-parameters or plugin options (e.g. align_weight=0.3; repeatable; "
        "needs --tag, so the method's own result is not overwritten)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="2 tasks (every domain), 1 epoch, small subset, slim backbone (CPU)"
    )
    ap.add_argument("--demo", action="store_true", help="use the Fashion-MNIST sample embedded in cvm_edge (offline)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results root (files go to OUT/PROTOCOL/)")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` strings -> (key, value) pairs; the value is read as JSON (``0.3``, ``true``)
    or else kept as text (``sgd``). Keys must be hyper-parameters some method resolves or plugin
    options: a misspelt key would otherwise be recorded and change nothing."""
    known = {f.name for f in dataclasses.fields(PluginOptions)}
    for m in METHODS.values():
        known |= set(m.resolved(500))
    out: list[tuple[str, Any]] = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--hp {item!r}: expected KEY=VALUE")
        if key not in known:
            raise SystemExit(f"--hp {item!r}: unknown key {key!r}; choose from {', '.join(sorted(known))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.append((key, value))
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = PROTOCOLS[args.protocol]
    names = args.method.split(",") if args.method else list(SMOKE_METHODS if args.smoke else METHODS)
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    out_dir = args.out / protocol.name
    use_demo = bool(args.demo)
    smoke: dict[str, Any] = {}
    if args.smoke:
        root = data_root()
        use_demo = use_demo or root is None or not all((root / d).is_dir() for d in protocol.datasets)
        smoke = {
            "epochs": args.epochs or 1,
            # a domain-incremental protocol's point is the sequence of domains: all of them
            "n_tasks": args.tasks or (len(protocol.domains) if protocol.domains else 2),
            "train_per_class": args.train_per_class or 200,
            "test_per_class": args.test_per_class or 100,
            "backbone": args.backbone or "resnet10_cifar_slim",
        }
        out_dir = args.out / "smoke" / protocol.name
    argv_list = ["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]
    overrides = parse_overrides(args.hp)
    if overrides and not args.tag:
        raise SystemExit("--hp needs --tag: the run would overwrite the method's own result file")
    for name in names:
        spec = RunSpec(
            protocol=protocol,
            method=METHODS[name],
            buffer=args.buffer,
            seed=args.seed,
            device=args.device,
            epochs=smoke.get("epochs", args.epochs),
            n_tasks=smoke.get("n_tasks", args.tasks),
            train_per_class=smoke.get("train_per_class", args.train_per_class),
            test_per_class=smoke.get("test_per_class", args.test_per_class),
            use_demo=use_demo,
            image_size=args.image_size,
            backbone=smoke.get("backbone", args.backbone),
            pretrained=args.pretrained,
            train_backbone=args.train_backbone,
            channels_last=args.channels_last,
            amp_bf16=args.bf16,
            compile_mode=args.compile,
            cuda_graph=args.cuda_graph,
            tag=args.tag,
            overrides=overrides,
        )
        rec = run(spec, out_dir, argv_list)
        forg = rec["forgetting"]
        print(
            f"{protocol.name} {spec.run_name}: final {rec['final_avg_acc']:.2f}%"
            f" forgetting {'n/a' if forg is None else f'{forg:.2f}'}"
            f" wall {rec['wall_s']:.1f}s -> {rec['path']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
