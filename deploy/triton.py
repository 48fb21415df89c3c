"""A Triton Inference Server model repository from a published bundle (``cvm export --format triton``).

Layout (Triton's model repository, ONNX Runtime backend)::

    OUT/cvm/config.pbtxt       platform onnxruntime_onnx, inputs/outputs, dynamic batching
    OUT/cvm/labels.txt         one class name a line, in the order of the ``logits`` output
    OUT/cvm/manifest.json      the bundle's manifest: preprocessing a client must apply, parity
    OUT/cvm/1/model.onnx       the bundle's model, byte for byte (sha256 checked)

Triton gets the normalised float32 ``[B, 3, S, S]`` tensor, as ``/v2/models/cvm/infer`` of
``cvm serve`` does; the client resizes, crops and normalises per ``manifest.json``. Torch-free:
this module reads a bundle directory only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cvm_edge.errors import StoreError, UsageError
from cvm_edge.fsutil import TMP_PREFIX, clean_stale_tmp, fsync_dir, fsync_tree, make_tmp_dir, write_error
from deploy.bundle import FORMAT, MANIFEST_FILE, MODEL_FILE, load_bundle

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
VERSION_DIR = "1"  # Triton serves the numbered sub-folders; one version, replaced on each export
PLATFORM = "onnxruntime_onnx"


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    model_name: str = "cvm"
    # Largest batch Triton forms or accepts; the exported graph's batch axis is dynamic.
    max_batch_size: int = 64
    # How long Triton holds a request to batch it with others (dynamic_batching).
    max_queue_delay_us: int = 1000

    def __post_init__(self) -> None:
        if not self.model_name or self.model_name.startswith(".") or "/" in self.model_name:
            raise UsageError(f"bad Triton model name {self.model_name!r}")
        if self.max_batch_size < 1:
            raise UsageError(f"max batch size must be at least 1, not {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise UsageError(f"queue delay must be at least 0, not {self.max_queue_delay_us}")


def _dims(shape: list[int]) -> str:
    """Triton dims leave out the batch axis (max_batch_size > 0); -1 marks a variable size."""
    return "[ " + ", ".join(str(int(d)) for d in shape[1:]) + " ]"


def _quote(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal for our ASCII names


def config_pbtxt(manifest: dict[str, Any], opts: TritonOptions) -> str:
    """``config.pbtxt`` (Triton's ModelConfig in protobuf text format) for a bundle's manifest."""
    inp = manifest["input"]
    outputs = []
    for out in manifest["outputs"]:
        label = f"\n    label_filename: {_quote(LABELS_FILE)}" if out["name"] == "logits" else ""
        outputs.append(
            "  {\n"
            f"    name: {_quote(out['name'])}\n"
            f"    data_type: TYPE_{out['datatype']}\n"
            f"    dims: {_dims(out['shape'])}{label}\n"
            "  }"
        )
    return (
        f"name: {_quote(opts.model_name)}\n"
        f"platform: {_quote(PLATFORM)}\n"
        f"max_batch_size: {opts.max_batch_size}\n"
        "input [\n"
        "  {\n"
        f"    name: {_quote(inp['name'])}\n"
        f"    data_type: TYPE_{inp['datatype']}\n"
        "    format: FORMAT_NCHW\n"
        f"    dims: {_dims(inp['shape'])}\n"
        "  }\n"
        "]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {opts.max_queue_delay_us}\n"
        "}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def _is_ours(model_dir: Path) -> bool:
    try:
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT and (model_dir / CONFIG_FILE).is_file()


def write_repository(bundle_dir: Path, out: Path, opts: TritonOptions | None = None) -> Path:
    """Write ``out/<model_name>/`` from a bundle directory; returns that folder.

    The model folder is built in a temp folder, fsynced and renamed into place. An earlier cvm
    export there is replaced (moved aside, then removed); any other folder of that name is refused."""
    opts = opts or TritonOptions()
    bundle = load_bundle(bundle_dir)
    model = bundle.read_verified_model()
    classes = bundle.classes
    if any("\n" in c or "\r" in c for c in classes):
        raise UsageError("a class name holds a line break; Triton's label file has one name a line")
    final = out / opts.model_name
    if final.exists() and not _is_ours(final):
        raise UsageError(f"{final} exists and is not a cvm export; refusing to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(out)  # what a killed export left here: only names starting with TMP_PREFIX
        tmp = make_tmp_dir(out, opts.model_name)
    except OSError as exc:
        raise write_error("the Triton model repository", out, exc) from None
    old = out / f"{TMP_PREFIX}old-{opts.model_name}.{os.getpid()}"
    try:
        (tmp / VERSION_DIR).mkdir()
        (tmp / VERSION_DIR / MODEL_FILE).write_bytes(model)
        (tmp / LABELS_FILE).write_text("".join(c + "\n" for c in classes), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(bundle.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(config_pbtxt(bundle.manifest, opts), encoding="utf-8")
        fsync_tree(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(out)
    except OSError as exc:
        error = write_error(f"Triton model {opts.model_name}", out, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)  # the previous export stays in place
        raise StoreError(f"{error}; nothing was replaced") from None
    shutil.rmtree(old, ignore_errors=True)
    return final
