"""The Open Inference Protocol v2 (KServe) routes: ``GET /v2``, ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready`` and
``POST /v2/models/{name}/infer``, each model route also under ``/versions/{version}``.

This module owns the protocol: its JSON request and response shapes, with binary tensor data and
compressed bodies from :mod:`deploy.oip_binary`. Turning the tensor's numbers or encoded images
into the model's input, and running it, is the Predictor's (:meth:`Predictor.tensor_input`,
:meth:`Predictor.images_input`), the same code /v1/classify goes through."""

from __future__ import annotations

import base64
import binascii
import collections
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cvm_edge import __version__
from deploy import oip_binary
from deploy.imagedecode import ImageDecoder
from deploy.predictor import Outputs, Predictor
from deploy.server.body import read_body
from deploy.server.context import Serving
from deploy.server.errors import HTTPError
from deploy.server.settings import ServerSettings

V2_OUTPUTS = ("logits", "probabilities", "embedding", "label")
MAX_V2_DIMS = 8  # [B, 3, H, W] needs 4; anything far longer is garbage


def add_routes(app: FastAPI, serving: Serving) -> None:
    """Every v2 route: server and model metadata, health, and infer."""
    settings, holder, metrics, decoder = serving.settings, serving.holder, serving.metrics, serving.decoder

    def check_name(name: str) -> None:
        if name != settings.model_name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {settings.model_name!r}")

    def check_version(request: Request, predictor: Predictor) -> None:
        """The ``/versions/{version}`` routes serve only the version being served now."""
        version = request.path_params.get("version")
        if version is not None and version != predictor.name:
            raise HTTPError(
                404, f"model {settings.model_name!r} has no version {version!r} here; it serves {predictor.name!r}"
            )

    # The health and metadata endpoints are coroutines: they run on the event loop and take no
    # lock, so they never wait for a thread (decoding and inference hold those).
    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cvm-edge", "version": __version__, "extensions": [oip_binary.EXTENSION]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if holder.current is None:
            return JSONResponse({"ready": False, "error": "no model loaded"}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        check_name(name)
        predictor = holder.require()
        check_version(request, predictor)
        return _v2_metadata(settings, predictor)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, request: Request) -> Response:
        check_name(name)
        loaded = holder.current
        if loaded is not None:
            check_version(request, loaded.predictor)
        ok = loaded is not None
        body = {"name": name, "ready": ok} if ok else {"name": name, "ready": False, "error": "no model loaded"}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request) -> Response:
        check_name(name)
        raw = await read_body(request, settings.max_body_bytes, settings.request_timeout_s)
        predictor = holder.require()
        check_version(request, predictor)

        def work() -> tuple[int, Response]:  # parsing 10 MB of JSON is work too: not on the event loop
            # JSON or binary tensor data, maybe compressed (deploy/oip_binary.py)
            body = oip_binary.parse_request(raw, request.headers, settings.max_body_bytes, settings.predictor.max_batch)
            choice = oip_binary.binary_choice(body)
            x, rid, wanted = _v2_inputs(predictor, decoder, body)
            out = predictor.run(x).require_finite()
            answer: dict[str, Any] = {"model_name": name, "model_version": predictor.name}
            if rid is not None:
                answer["id"] = rid
            answer["outputs"] = _v2_outputs(predictor, out, wanted)
            return len(out.logits), oip_binary.respond(answer, choice)

        n, response = await serving.run_work(work)
        metrics.images.inc(n)
        return response


def _v2_inputs(predictor: Predictor, decoder: ImageDecoder, body: Any) -> tuple[np.ndarray, str | None, list[str]]:
    """The model input of a v2 infer request: float32 NCHW, the request id, the outputs wanted."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise HTTPError(400, "the request needs 'inputs': a list with one tensor")
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict):
        raise HTTPError(400, "each input must be an object with name, shape, datatype and data")
    shape, dtype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_V2_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise HTTPError(400, f"input 'shape' must be a list of at most {MAX_V2_DIMS} non-negative integers")
    if not isinstance(data, list | np.ndarray):  # an array: FP32 binary tensor data (deploy/oip_binary.py)
        raise HTTPError(400, "input 'data' must be a list (the JSON tensor encoding)")
    rid = body.get("id")
    wanted = V2_OUTPUTS if not body.get("outputs") else _v2_requested_outputs(body["outputs"])
    if dtype == "FP32":
        return predictor.tensor_input(data, shape), None if rid is None else str(rid), list(wanted)
    if dtype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] != len(data):
            raise HTTPError(400, f"BYTES input must have shape [B] or [B, 1] with B = {len(data)} elements")
        # counted before any image is decoded: the Predictor would refuse the batch only after that
        if not 1 <= len(data) <= predictor.options.max_batch:
            raise HTTPError(400, f"batch size must be 1..{predictor.options.max_batch}")
        images = []
        for i, item in enumerate(data):
            if isinstance(item, bytes):  # BYTES binary tensor data: the raw image
                images.append((f"element {i}", item))
                continue
            if not isinstance(item, str):
                raise HTTPError(400, f"BYTES element {i} must be a base64 string")
            try:
                images.append((f"element {i}", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise HTTPError(422, f"BYTES element {i} is not valid base64") from None
        return predictor.images_input(images, decoder), None if rid is None else str(rid), list(wanted)
    raise HTTPError(
        400, f"input datatype must be FP32 (a [B, 3, H, W] tensor) or BYTES (encoded images), not {dtype!r}"
    )


def _v2_requested_outputs(outputs: Any) -> list[str]:
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise HTTPError(400, "'outputs' must be a list of objects with a 'name'")
    names = [str(o["name"]) for o in outputs]
    unknown = [n for n in names if n not in V2_OUTPUTS]
    if unknown:
        raise HTTPError(400, f"unknown output(s) {', '.join(unknown)[:200]}; this model has {', '.join(V2_OUTPUTS)}")
    repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if repeated:  # each copy would be serialised again: a small request, a huge answer
        raise HTTPError(400, f"output(s) {', '.join(repeated)} requested more than once")
    return names


def _v2_outputs(predictor: Predictor, out: Outputs, wanted: list[str]) -> list[dict[str, Any]]:
    b = len(out.logits)
    tensors: dict[str, Callable[[], dict[str, Any]]] = {
        "logits": lambda: _fp32("logits", out.logits),
        "probabilities": lambda: _fp32("probabilities", out.probabilities),
        "embedding": lambda: _fp32("embedding", out.embedding),
        "label": lambda: {"name": "label", "datatype": "BYTES", "shape": [b], "data": predictor.labels(out)},
    }
    return [tensors[n]() for n in wanted]


def _fp32(name: str, a: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.astype(np.float32).ravel().tolist()}


def _v2_metadata(settings: ServerSettings, predictor: Predictor) -> dict[str, Any]:
    s = predictor.prep.image_size
    k = len(predictor.classes)
    emb = predictor.manifest.get("outputs", [{}, {"shape": [-1, -1]}])[1].get("shape", [-1, -1])
    return {
        "name": settings.model_name,
        "versions": [predictor.name],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, s, s]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "embedding", "datatype": "FP32", "shape": emb},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }
