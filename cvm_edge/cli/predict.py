"""``cvm predict``: classify image files with a store's current version (the backbone graph in onnxruntime
when the store has one, else the torch model)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvm_edge.argtypes import int_at_least
from cvm_edge.display import printable
from cvm_edge.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from cvm_edge.checkpoints import Checkpoint


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("predict", help="classify image files with the current version")
    p.add_argument_group("store").add_argument("--workdir", type=Path, required=True)
    p.add_argument("images", nargs="+", help="image files")
    output = p.add_argument_group("output")
    output.add_argument("--top-k", type=int_at_least(1), default=3)
    output.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)


def _read_pixels(ckpt: Checkpoint, images: Sequence[str]) -> np.ndarray:
    """The images as one batch of pixels in the store's preprocessing; an unreadable one is a usage error."""
    import numpy as np

    from cvm_edge.fsutil import MAX_IMAGE_BYTES, read_regular
    from cvm_edge.preprocess import load_pixels

    pixels = []
    for path in images:
        try:
            pixels.append(load_pixels(read_regular(Path(path), MAX_IMAGE_BYTES), ckpt.prep))  # no FIFO, no 2 GB file
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return np.stack(pixels)


def _logits(ckpt: Checkpoint, pixels: np.ndarray) -> tuple[np.ndarray, Any]:
    """(logits, the torch module that made them) of a batch of pixels."""
    from cvm_edge.loading import graph_to_run, head_from_checkpoint, model_from_checkpoint
    from cvm_edge.strategy import predict_logits

    graph = graph_to_run(ckpt)
    if graph is not None:
        # the store's backbone graph in onnxruntime and the head in torch: no timm module is built
        import torch

        from cvm_edge.frozen_features import GraphFeatures

        model = head_from_checkpoint(ckpt)
        features = GraphFeatures(graph, ckpt.prep)(pixels)
        with torch.inference_mode():
            return model(torch.from_numpy(features)).numpy(), model
    model = model_from_checkpoint(ckpt)
    return predict_logits(model, ckpt.prep, pixels), model


def _results(
    ckpt: Checkpoint, images: Sequence[str], logits: np.ndarray, model: Any, top_k: int
) -> list[dict[str, Any]]:
    """One result per image: its top-k labels and scores, and on an analytic store the unknown flag."""
    import numpy as np

    from cvm_edge.analytic_learner import logit_scale

    seen = np.asarray(ckpt.seen)
    sub = logits[:, seen]
    probs = np.exp(sub - sub.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    # Analytic stores calibrate an unknown threshold on their held-out images (the best class score,
    # logits / logit scale, of ~95 % of known images is above it): below it the image is flagged.
    threshold = ckpt.history[-1].get("unknown_threshold") if ckpt.history else None
    best = sub.max(axis=1) / logit_scale(model) if threshold is not None else sub.max(axis=1)
    k = min(top_k, len(seen))
    results: list[dict[str, Any]] = []
    for path, p, b in zip(images, probs, best, strict=True):
        top = np.argsort(-p)[:k]
        result: dict[str, Any] = {
            "image": str(path),
            "predictions": [{"label": ckpt.table.names[seen[i]], "score": round(float(p[i]), 6)} for i in top],
        }
        if threshold is not None:
            result.update(unknown=bool(b < threshold), best_score=round(float(b), 6), unknown_threshold=threshold)
        results.append(result)
    return results


def _print_results(results: list[dict[str, Any]]) -> None:
    for r in results:
        preds = ", ".join(f"{printable(q['label'])} {q['score']:.3f}" for q in r["predictions"])
        flag = (
            f" [unknown: best score {r['best_score']:.3f} < {r['unknown_threshold']:.3f}]" if r.get("unknown") else ""
        )
        print(f"{printable(r['image'])}: {preds}{flag}")


def cmd_predict(args: argparse.Namespace) -> int:
    from cvm_edge.checkpoints import CheckpointStore

    ckpt = CheckpointStore(args.workdir).load(ridge_statistics=False)  # an analytic store's sums are not needed
    if not ckpt.seen:
        raise UsageError("the model has not learned any class yet; run `cvm update` first")
    logits, model = _logits(ckpt, _read_pixels(ckpt, args.images))
    results = _results(ckpt, args.images, logits, model, args.top_k)
    if args.json:
        print(json.dumps({"model_version": ckpt.version, "results": results}, indent=2))
    else:
        _print_results(results)
    return 0
