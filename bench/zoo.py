"""The backbone zoo: every edge backbone through the whole product chain, with the figures a user
picks a backbone by.

    python -m bench.zoo                                   # every backbone of cvm_edge.backbones.EDGE_ZOO
    python -m bench.zoo --models lcnet_050,resnet18 --queries 30

Per backbone, random init (no weights are fetched), on a tiny Fashion-MNIST cut (``--per-class``
images of two classes, 1 epoch) at ``--image-size`` (default 224):

- the chain, each step through ``cvm_edge.cli.main`` as a user types it: ``cvm init``, ``cvm update``
  (which exports the fp32 bundle through its gate), ``cvm export --precision fp16`` and ``int8``
  (each passes its gate or is refused, with the figure named), ``cvm predict``, and the served
  answer: the deploy Predictor (what ``cvm serve`` runs) on the same JPEG must name the same top class;
- parameters (backbone, whole model), FLOPs of one image at the store's size (torch's FlopCounterMode);
- bare onnxruntime p50/p99 latency of one image, 1 and 2 intra-op threads, fp32 and int8 bundles
  (``--queries`` timed runs after warm-up; short runs on a shared machine: read them as a ranking).

Results: ``bench/results/zoo.json`` (merged per backbone, so a run of a few models updates their
rows); ``python -m bench.report`` renders the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.provenance import REPO, provenance
from cvm_edge.backbones import EDGE_ZOO
from cvm_edge.fsutil import atomic_write_json

log = logging.getLogger("bench.zoo")
RESULT = REPO / "bench" / "results" / "zoo.json"
CLASSES = (0, 1)  # T-shirt/top, Trouser


def cli(*argv: str) -> tuple[int, str, str]:
    """One ``cvm`` command in this process: (exit code, stdout, the last line of stderr)."""
    from cvm_edge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return code, out.getvalue(), lines[-1] if lines else ""


def timed_ms(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def onnx_latency(model: Path, image_size: int, threads: int, warmup: int, queries: int) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    feed = {"input": x}
    timed_ms(lambda: sess.run(None, feed), warmup)
    a = np.asarray(timed_ms(lambda: sess.run(None, feed), queries))
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def model_figures(workdir: Path) -> dict[str, Any]:
    from bench.inference import count_flops
    from cvm_edge.backbones import count_parameters
    from cvm_edge.checkpoints import CheckpointStore
    from cvm_edge.loading import model_from_checkpoint

    ckpt = CheckpointStore(workdir).load()
    model = model_from_checkpoint(ckpt)
    return {
        "backbone_params": count_parameters(model.backbone),
        "model_params": count_parameters(model),
        "flops": count_flops(model.backbone, ckpt.prep.image_size),
    }


def chain(name: str, table: Path, data: Path, image_size: int, work: Path) -> dict[str, Any]:
    """init -> update (fp32 bundle) -> export fp16, int8 -> predict -> served answer; one dict of outcomes."""
    from deploy.bundle import bundles_root, latest_bundle_of
    from deploy.predictor import Predictor, PredictorOptions

    wd = work / name
    steps: dict[str, Any] = {}
    init = ["init", "--workdir", str(wd), "--concepts", str(table), "--backbone", name]
    code, _, err = cli("-q", *init, "--pretrained", "none", "--image-size", str(image_size))
    steps["init"] = {"exit": code, **({"error": err} if code else {})}
    if code:
        return {"steps": steps, "passed": False}
    t = time.perf_counter()
    upd = ["update", "--workdir", str(wd), "--data", str(data), "--epochs", "1", "--no-progress"]
    code, _, err = cli("-q", *upd)
    steps["update"] = {"exit": code, "seconds": round(time.perf_counter() - t, 1), **({"error": err} if code else {})}
    if code:
        return {"steps": steps, "passed": False}
    gates: dict[str, Any] = {}
    for precision in ("fp32", "fp16", "int8"):
        refused = None
        if precision != "fp32":
            code, _, err = cli("export", "--workdir", str(wd), "--precision", precision)
            if code and "--calibration minmax" in err:  # what a user does next when percentile cannot calibrate
                refused = err
                code, _, err = cli("export", "--workdir", str(wd), "--precision", precision, "--calibration", "minmax")
            if code:
                gates[precision] = {"passed": False, "exit": code, "error": err, "percentile_error": refused}
                continue
        bundle = latest_bundle_of(wd, 2, precision)
        assert bundle is not None
        manifest = json.loads((bundles_root(wd) / bundle / "manifest.json").read_text())
        p = manifest["parity"]
        gates[precision] = {
            "passed": bool(p["passed"]),
            "bundle": bundle,
            **{k: p[k] for k in manifest["parity"]["gates"]},
            **({"calibration": p["calibration"]["method"], "percentile_error": refused} if refused else {}),
        }
    steps["gates"] = gates
    image = next((data / "trouser").iterdir())
    code, out, err = cli("predict", "--workdir", str(wd), str(image), "--json")
    top = json.loads(out)["results"][0]["predictions"][0]["label"] if code == 0 else None
    steps["predict"] = {"exit": code, "top1": top, **({"error": err} if code else {})}
    fp32 = bundles_root(wd) / gates["fp32"]["bundle"]
    served = Predictor(fp32, PredictorOptions(intra_op_threads=1)).classify([image.read_bytes()], 1)[0][0]["label"]
    steps["served"] = {"bundle": fp32.name, "top1": served, "same_as_predict": served == top}
    passed = code == 0 and gates["fp32"]["passed"] and gates["fp16"]["passed"] and served == top
    return {"steps": steps, "passed": bool(passed), "workdir": wd}


def run_backbone(name: str, table: Path, data: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from deploy.bundle import bundles_root

    start = time.perf_counter()
    row: dict[str, Any] = {"backbone": name, "image_size": args.image_size}
    result = chain(name, table, data, args.image_size, work)
    wd = result.pop("workdir", None)
    row.update(result)
    if wd is not None:
        row.update(model_figures(wd))
        latency: dict[str, Any] = {}
        for precision, gate in row["steps"]["gates"].items():
            if precision == "fp16" or not gate["passed"]:
                continue
            model = bundles_root(wd) / gate["bundle"] / "model.onnx"
            for threads in args.threads:
                latency[f"{precision}_{threads}t"] = onnx_latency(
                    model, args.image_size, threads, args.warmup, args.queries
                )
        row["onnx_latency"] = latency
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def prepare(work: Path, per_class: int) -> tuple[Path, Path]:
    """The concept table of the two classes (bundled MiniLM) and their update folder."""
    from cvm_edge.demo import load_sample, sample_class_names, write_class_folders

    names = sample_class_names()
    (work / "classes.txt").write_text("".join(names[c] + "\n" for c in CLASSES))
    code, _, err = cli("-q", "embed", "build", "--classes", str(work / "classes.txt"), "--out", str(work / "t.npz"))
    if code:
        raise SystemExit(f"cvm embed build failed: {err}")
    s = load_sample()
    keep = np.concatenate([np.flatnonzero(s["train_labels"] == c)[:per_class] for c in CLASSES])
    data = write_class_folders(work / "data", s["train_images"][keep], s["train_labels"][keep], names, CLASSES)
    return work / "t.npz", data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--models", default=",".join(EDGE_ZOO), help="comma list of timm names (default: EDGE_ZOO)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=40, help="training images of each of the two classes")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts timed")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--queries", type=int, default=40, help="timed runs per (precision, threads)")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--work", type=Path, default=None, help="keep the stores here (default: a temp dir)")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    # Each row names the run that measured it (rows of an older file inherit that file's provenance).
    rows = {
        r["backbone"]: {**{k: previous[k] for k in ("command", "git_commit", "date")}, **r}
        for r in previous.get("backbones", [])
    }
    # Taken once, before any store is built: the commit and the load at the start of this run.
    origin = provenance("python -m bench.zoo", sys.argv[1:] if argv is None else argv)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cvm-zoo-")))
        work.mkdir(parents=True, exist_ok=True)
        table, data = prepare(work, args.per_class)
        for name in args.models:
            log.info("%s: init -> update -> export fp32/fp16/int8 -> predict -> serve, then latency", name)
            row = {k: origin[k] for k in ("command", "git_commit", "date")}
            row.update(run_backbone(name, table, data, args, work))
            rows[name] = row
            log.info("%s: %s in %.0f s", name, "passed" if row["passed"] else "FAILED", row["seconds"])
            result = {
                "benchmark": "zoo",
                **origin,
                "settings": {
                    "image_size": args.image_size,
                    "per_class": args.per_class,
                    "classes": 2,
                    "epochs": 1,
                    "init": "random (--pretrained none)",
                    "threads": args.threads,
                    "warmup": args.warmup,
                    "queries": args.queries,
                },
                "backbones": [rows[n] for n in [*EDGE_ZOO, *sorted(set(rows) - set(EDGE_ZOO))] if n in rows],
            }
            atomic_write_json(args.out, result)  # after every backbone: a cut run keeps what it measured
    failed = [n for n in args.models if not rows[n]["passed"]]
    print(f"wrote {args.out}: {len(args.models) - len(failed)} of {len(args.models)} passed the chain")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
