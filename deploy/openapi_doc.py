"""``/openapi.json`` as the server really behaves. Most routes read their body by hand (raw images,
multipart, v2 binary tensor data), so FastAPI can infer neither their request bodies nor their
errors; :func:`install` completes the generated document: the request bodies, the one error
schema ``{"error": "..."}`` with each route's statuses, and ``/metrics`` as Prometheus text.
Routes it does not know get the error schema as their ``default`` response."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST

from deploy.oip_binary import HEADER_LENGTH

_REF = "#/components/schemas/"
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "application/octet-stream")
_TENSOR_DATA = {
    "description": "JSON tensor encoding: numbers (FP32) or base64 strings (BYTES), flat or nested",
    "type": "array",
    "items": {},
}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "what was wrong, in one line"}},
        "additionalProperties": False,
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "examples": ["input", "image"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
            "datatype": {
                "type": "string",
                "enum": ["FP32", "BYTES"],
                "description": "FP32: a normalised [B, 3, H, W] tensor; BYTES: [B] encoded images",
            },
            "data": _TENSOR_DATA,
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data_size": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "binary tensor data: the input's bytes follow the JSON header instead of 'data'",
                    }
                },
            },
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": ["logits", "probabilities", "embedding", "label"]},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": _REF + "RequestInput"}, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": {"$ref": _REF + "RequestOutput"}},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
            "data": _TENSOR_DATA,
            "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": _REF + "ResponseOutput"}},
        },
    },
    "Prediction": {
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
    },
    "ClassifyResult": {
        "type": "object",
        "required": ["model_version", "latency_ms"],
        "properties": {
            "model_version": {"type": "string"},
            "predictions": {"type": "array", "items": {"$ref": _REF + "Prediction"}, "description": "one image"},
            "results": {
                "type": "array",
                "description": "several multipart files, in order",
                "items": {
                    "type": "object",
                    "properties": {
                        "filename": {"type": ["string", "null"]},
                        "predictions": {"type": "array", "items": {"$ref": _REF + "Prediction"}},
                    },
                },
            },
            "latency_ms": {"type": "number"},
        },
    },
}
_INFER_BODY = {
    "required": True,
    "description": (
        "An Open Inference Protocol v2 request: JSON, or with the binary tensor data extension the JSON "
        f"header ({HEADER_LENGTH} bytes) followed by the raw bytes of each input that declares "
        "binary_data_size (FP32: little-endian float32; BYTES: per element a 4-byte little-endian length, "
        "then the encoded image). May be compressed (Content-Encoding gzip or deflate); the body limit "
        "holds before and after decompression."
    ),
    "content": {
        "application/json": {"schema": {"$ref": _REF + "InferenceRequest"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_INFER_HEADERS = [
    {
        "name": HEADER_LENGTH,
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "binary tensor data: the length of the JSON header at the start of the body",
    },
    {
        "name": "Content-Encoding",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "enum": ["identity", "gzip", "deflate"]},
    },
]
_INFER_OK = {
    "description": "The outputs; binary ones (binary_data, binary_data_output) follow the JSON header",
    "headers": {HEADER_LENGTH: {"schema": {"type": "integer"}, "description": "set when some output is binary"}},
    "content": {
        "application/json": {"schema": {"$ref": _REF + "InferenceResponse"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_CLASSIFY_BODY = {
    "required": True,
    "description": "One image as the body, or multipart/form-data with one or more 'file' parts",
    "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in _IMAGE_TYPES},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            }
        },
    },
}
# (method, path pattern) -> the statuses a route answers besides 200, and its documentation
_ROUTES: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
    (
        "post",
        r"/v1/classify",
        {
            "400": "bad multipart body or too many files",
            "413": "body or image over its limit",
            "415": "not a supported image type",
            "422": "unreadable image or bad top_k",
            "503": "no model loaded, or the batch queue is full",
        },
        {
            "requestBody": _CLASSIFY_BODY,
            "ok": {"$ref": _REF + "ClassifyResult"},
            # read by the route itself (deploy/server/v1.py: parse_top_k), so FastAPI does not declare it
            "parameters": [
                {
                    "name": "top_k",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5},
                }
            ],
        },
    ),
    ("get", r"/v2/health/ready", {"503": "no model loaded"}, {}),
    (
        "get",
        r"/v2/models/\{name\}(/versions/\{version\})?",
        {"404": "unknown model or version", "503": "no model loaded"},
        {},
    ),
    (
        "get",
        r"/v2/models/\{name\}(/versions/\{version\})?/ready",
        {"404": "unknown model or version", "503": "no model loaded"},
        {},
    ),
    (
        "post",
        r"/v2/models/\{name\}(/versions/\{version\})?/infer",
        {
            "400": "malformed request, tensor or binary data",
            "404": "unknown model or version",
            "413": "body over the limit, before or after decompression",
            "415": "unsupported Content-Encoding or image type",
            "422": "non-finite input or unreadable image",
            "503": "no model loaded",
        },
        {"requestBody": _INFER_BODY, "parameters": _INFER_HEADERS, "ok_response": _INFER_OK},
    ),
    (
        "post",
        r"/v1/admin/reload",
        {
            "401": "missing or wrong bearer token",
            "404": "admin endpoint disabled",
            "409": "nothing published yet",
            "500": "the bundle failed to load",
        },
        {"security": [{"bearer": []}]},
    ),
]


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": _REF + "Error"}}}}


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Complete a FastAPI-generated OpenAPI ``schema`` in place (and return it)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(SCHEMAS)
    for unused in ("HTTPValidationError", "ValidationError"):  # our 422s are {"error": ...} too
        components["schemas"].pop(unused, None)
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            responses["default"] = _error_response("an error: JSON with one 'error' message")
            _declare_path_params(path, op)
            for m, pattern, statuses, extra in _ROUTES:
                if m == method and re.fullmatch(pattern, path):
                    _apply(op, statuses, extra)
    metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {
            "description": "Prometheus metrics in the text exposition format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},  # what the route sends
        }
    return schema


def _apply(op: dict[str, Any], statuses: dict[str, str], extra: dict[str, Any]) -> None:
    for status, text in statuses.items():
        op["responses"][status] = _error_response(text)
    if "requestBody" in extra:
        op["requestBody"] = extra["requestBody"]
    if "parameters" in extra:
        op.setdefault("parameters", []).extend(extra["parameters"])
    if "security" in extra:
        op["security"] = extra["security"]
    if "ok" in extra:
        op["responses"]["200"] = {
            "description": "Successful Response",
            "content": {"application/json": {"schema": extra["ok"]}},
        }
    if "ok_response" in extra:
        op["responses"]["200"] = extra["ok_response"]


def _declare_path_params(path: str, op: dict[str, Any]) -> None:
    """Path parameters the route reads from ``request.path_params`` (``{version}``) are declared too."""
    params = op.setdefault("parameters", [])
    have = {p.get("name") for p in params if p.get("in") == "path"}
    for name in re.findall(r"\{(\w+)\}", path):
        if name not in have:
            params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})


def install(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
