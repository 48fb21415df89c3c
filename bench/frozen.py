"""Methods on frozen backbone features: the analytic learner beside its training-free baselines.

One backbone pass per image (cached on disk by dataset, size and backbone, so three seeds and four
methods share it), then per task:

- ``ncm``: nearest class mean, cosine (SimpleCIL): no training, no images kept;
- ``ranpac``: the product's analytic learner with one-hot targets (RanPAC's ridge on random ReLU
  features);
- ``cvm-analytic``: the product's analytic learner with concept-row targets (the CVM mapping in closed
  form), through ``cvm_edge.analytic_learner.learn``, the code ``cvm update`` runs;
- ``joint-probe``: multinomial logistic regression on all tasks' features at once (upper bound).

The analytic methods hold out 20 % of each task's stream (at most 100 images a class, as ``cvm
update``) to choose lambda and do not train on it. Concept-target runs also measure what one-hot heads
cannot give: generalised zero-shot accuracy of two classes that no task trains (a second fit without
them) and the AUROC of "unknown" (best class score) between seen and never-seen classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench import provenance
from bench.datasets import cache_dir
from bench.metrics import forgetting_per_task, summarise
from bench.protocols import Scenario
from bench.tables import concept_vectors
from cvm_edge import analytic_learner as al
from cvm_edge.data import ImageSet, holdout_split
from cvm_edge.model import ModelConfig, build_model

log = logging.getLogger(__name__)

LEARNERS = ("ncm", "analytic", "probe")
HOLDOUT = 0.2
ZERO_SHOT_CLASSES = 2


@dataclasses.dataclass(frozen=True)
class Features:
    train: np.ndarray  # [N, F] float32
    test: np.ndarray
    seconds: float  # backbone time (0 when read from the cache)
    cached: bool


def _key(scenario: Scenario, backbone: str, size: int) -> str:
    h = hashlib.sha1()
    for arr in (scenario.train.images, scenario.test.images):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr[:: max(1, len(arr) // 64)]).tobytes())
    return f"{'+'.join(scenario.sources)}-{backbone}-{size}-{h.hexdigest()[:12]}"


def extract(backbone: torch.nn.Module, name: str, prep: Any, scenario: Scenario, device: str, size: int) -> Features:
    """Backbone features of every train and test image, from the cache or computed (float16 on disk)."""
    path = cache_dir() / "features" / f"{_key(scenario, name, size)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Features(z["train"].astype(np.float32), z["test"].astype(np.float32), 0.0, True)
    t0 = time.perf_counter()
    backbone.to(device)
    train = al.backbone_features(backbone, prep, scenario.train.images, device)
    test = al.backbone_features(backbone, prep, scenario.test.images, device)
    seconds = time.perf_counter() - t0
    backbone.to("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")  # parallel runs of one protocol each write their own
    np.savez(tmp, train=train.astype(np.float16), test=test.astype(np.float16))
    tmp.replace(path)
    return Features(train, test, seconds, False)


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return round(100.0 * float((pred == labels).mean()), 3)


def _row(predict: Any, feats: np.ndarray, labels: np.ndarray, tasks: Sequence[Sequence[int]], n_eval: int) -> list:
    row: list[float | None] = []
    for j, classes in enumerate(tasks):
        if j >= n_eval:
            row.append(None)
            continue
        m = np.isin(labels, classes)
        row.append(_accuracy(predict(feats[m]), labels[m]))
    return row


def ncm_predict(means: np.ndarray, seen: Sequence[int], feats: np.ndarray) -> np.ndarray:
    """Nearest class mean by cosine, among ``seen``."""
    mu = means[list(seen)]
    mu = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return np.asarray(seen)[np.argmax(f @ mu.T, axis=1)]


def joint_probe(train: np.ndarray, labels: np.ndarray, n_classes: int, seed: int, device: str) -> Any:
    """Multinomial logistic regression on standardised features (L-BFGS, small L2): the joint
    linear probe every frozen-feature method is measured against."""
    torch.manual_seed(seed)
    mu, sd = train.mean(0), train.std(0) + 1e-6
    x = torch.from_numpy((train - mu) / sd).float().to(device)
    y = torch.from_numpy(labels).long().to(device)
    lin = torch.nn.Linear(x.shape[1], n_classes).to(device)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    @torch.no_grad()
    def predict(feats: np.ndarray) -> np.ndarray:
        z = torch.from_numpy((feats - mu) / sd).float().to(device)
        return lin(z).argmax(1).cpu().numpy()

    return predict


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a seen-class image > score of a never-seen one), ties counting half."""
    if not len(pos) or not len(neg):
        return None
    allv = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(allv, kind="stable"), kind="stable").astype(np.float64) + 1
    # average ranks of ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_pos = ranks[: len(pos)].sum()
    return round(float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))), 4)


def _analytic_model(scenario: Scenario, spec: Any, hp: dict[str, Any], name: str) -> Any:
    table, fp = concept_vectors(scenario.class_names, spec.method.prototypes)
    config = ModelConfig(
        backbone=name,
        image_size=spec.size,
        train_backbone="none",
        head="concepts",
        learner="analytic",
        analytic_dim=int(hp.get("analytic_dim", 2048)),
        analytic_seed=spec.seed,
        analytic_targets=str(hp.get("targets", "concepts")),
    )
    return config, table, fp


def _fit_stream(
    model: Any,
    table: np.ndarray,
    feats: np.ndarray,
    labels: np.ndarray,
    tasks: Sequence[Sequence[int]],
    seed: int,
    on_task: Any = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Learn the tasks one after the other through the product's analytic learner."""
    state = al.AnalyticState.empty(model)
    seen: list[int] = []
    info = []
    for t, classes in enumerate(tasks):
        m = np.isin(labels, classes)
        tr, va = holdout_split(ImageSet(feats[m], labels[m]), HOLDOUT, seed + t)
        seen = sorted(set(seen) | set(classes))
        t0 = time.perf_counter()
        learned = al.learn(model, table, state, tr.pixels, tr.labels, va.pixels, va.labels, seen, t + 1)
        state = learned.state
        info.append(
            {
                "train_s": round(time.perf_counter() - t0, 3),
                "n_train": len(tr),
                "n_holdout": len(va),
                "relative_lambda": learned.choice.relative_lambda,
                "lambda_scores": learned.choice.scores,
                "stored_bytes": state.nbytes,
            }
        )
        if on_task is not None:
            on_task(t, seen, info[-1])
    return state, info


def run_frozen(
    spec: Any, scenario: Scenario, backbone: torch.nn.Module, name: str, prep: Any, hp: dict[str, Any]
) -> dict[str, Any]:
    """The accuracy matrix and per-task figures of one frozen-feature method (``spec.method.learner``)."""
    feats = extract(backbone, name, prep, scenario, spec.device, spec.size)
    ytr, yte = scenario.train.labels, scenario.test.labels
    tasks = list(scenario.tasks)
    learner = spec.method.learner
    matrix: list[list[float | None]] = []
    per_task: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"feature_s": round(feats.seconds, 2), "features_cached": feats.cached}
    if learner == "ncm":
        seen: list[int] = []
        means = np.zeros((len(scenario.class_names), feats.train.shape[1]))
        for t, classes in enumerate(tasks):
            t0 = time.perf_counter()
            for c in classes:
                means[c] = feats.train[ytr == c].mean(0)
            seen = sorted(set(seen) | set(classes))
            dt = time.perf_counter() - t0
            matrix.append(_row(lambda f, s=seen: ncm_predict(means, s, f), feats.test, yte, tasks, t + 1))
            per_task.append(
                {"task": t, "classes": list(classes), "train_s": round(dt, 4), "stored_bytes": means[seen].nbytes}
            )
        extra["stored_bytes"] = int(means[seen].nbytes)
    elif learner == "probe":
        t0 = time.perf_counter()
        allc = sorted({c for t in tasks for c in t})
        m = np.isin(ytr, allc)
        predict = joint_probe(feats.train[m], ytr[m], len(scenario.class_names), spec.seed, spec.device)
        matrix.append(_row(predict, feats.test, yte, tasks, len(tasks)))
        per_task.append({"task": 0, "classes": allc, "train_s": round(time.perf_counter() - t0, 3)})
    else:
        config, table, fp = _analytic_model(scenario, spec, hp, name)
        extra["concept_table"] = fp
        model = build_model(config, table, pretrained_backbone=backbone).eval()

        def on_task(t: int, seen: list[int], info: dict[str, Any]) -> None:
            matrix.append(_row(lambda f: al.predict_rows(model, f, seen), feats.test, yte, tasks, t + 1))
            per_task.append({"task": t, "classes": list(tasks[t]), **info})

        state, _ = _fit_stream(model, table, feats.train, ytr, tasks, spec.seed, on_task)
        extra["stored_bytes"] = state.nbytes
        extra["open_set"] = _open_set(model, table, feats, scenario, spec.seed, hp)
    summary = (
        {
            "final_avg_acc": float(np.mean([v for v in matrix[-1] if v is not None])),
            "avg_incremental_acc": None,
            "forgetting": None,
            "bwt": None,
        }
        if learner == "probe"
        else summarise(matrix)
    )
    return {
        "summary": summary,
        "acc_matrix": matrix,
        "forgetting_per_task": None if learner == "probe" else forgetting_per_task(matrix),
        "per_task": per_task,
        **extra,
    }


def _open_set(
    model: Any, table: np.ndarray, feats: Features, scenario: Scenario, seed: int, hp: dict[str, Any]
) -> dict[str, Any]:
    """Hold out two seeded classes that no task trains, learn the rest, then measure (a) their
    generalised zero-shot top-1 among every class (concept targets only: a one-hot head has no row
    for them) and (b) the AUROC of the best seen-class score between seen and never-seen images."""
    rng = np.random.default_rng(seed + 7)
    n = len(scenario.class_names)
    held = sorted(int(c) for c in rng.choice(n, ZERO_SHOT_CLASSES, replace=False))
    tasks = [[c for c in t if c not in held] for t in scenario.tasks]
    tasks = [t for t in tasks if t]
    ytr, yte = scenario.train.labels, scenario.test.labels
    _fit_stream(model, table, feats.train, ytr, tasks, seed)
    seen = sorted({c for t in tasks for c in t})
    mapper = al.analytic_mapper(model)
    with torch.no_grad():
        out = mapper(torch.from_numpy(feats.test).float()).numpy()
    onehot = hp.get("targets") == "onehot"
    if onehot:
        scores = out
    else:
        z = torch.nn.functional.normalize(torch.from_numpy(out), dim=-1)
        scores = model.head.cosines(z).numpy()
    best_seen = scores[:, seen].max(1)
    is_held = np.isin(yte, held)
    result: dict[str, Any] = {
        "held_out_classes": [scenario.class_names[c] for c in held],
        "unknown_auroc": _auroc(best_seen[~is_held], best_seen[is_held]),
    }
    if not onehot:
        every = sorted(seen + held)
        pred = np.asarray(every)[np.argmax(scores[:, every], axis=1)]
        result["zero_shot_top1"] = _accuracy(pred[is_held], yte[is_held])
        result["seen_top1_with_zero_shot_rows"] = _accuracy(pred[~is_held], yte[~is_held])
        result["chance"] = round(100.0 / len(every), 3)
    return result


def record_fields(
    spec: Any,
    result: dict[str, Any],
    wall: float,
    argv: Sequence[str],
    machine: dict[str, Any],
    versions: dict[str, Any],
    hp: dict[str, Any],
    prep: Any,
    peak_rss_mb: float,
) -> dict[str, Any]:
    """The run JSON's fields (the same keys ``bench.run`` writes for trained methods)."""
    s = result["summary"]
    return {
        **{k: (None if v is None else round(v, 3)) for k, v in s.items()},
        "acc_matrix": result["acc_matrix"],
        "forgetting_per_task": result["forgetting_per_task"],
        "wall_s": round(wall, 2),
        "feature_s": result["feature_s"],
        "features_cached": result["features_cached"],
        "train_s": round(sum(p.get("train_s", 0.0) for p in result["per_task"]), 3),
        "per_task": result["per_task"],
        "stored_bytes": {"total": int(result.get("stored_bytes", 0)), "images": 0},
        "buffer_bytes": 0,
        "open_set": result.get("open_set"),
        "peak_memory": {"rss_mb": round(peak_rss_mb, 1)},
        "hyperparameters": {
            "learner": spec.method.learner,
            **hp,
            "holdout": HOLDOUT if spec.method.learner == "analytic" else None,
            "preprocessing": prep.to_dict(),
            "features": "frozen backbone, eval mode, computed once (float16 cache)",
        },
        "git_commit": provenance.git_commit(),
        "machine": machine,
        "device": spec.device,
        "versions": versions,
        "date": provenance.utc_now(),
        "command": " ".join(argv),
    }
