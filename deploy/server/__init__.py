"""The HTTP server: FastAPI on uvicorn, built by :func:`create_app` from :class:`ServerSettings`.

Endpoints (every error is ``{"error": "..."}`` with its status):

- ``POST /v1/classify`` - one image as the raw body, or multipart ``file`` parts (several allowed)
- Open Inference Protocol v2 subset: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``
  (each also under ``/v2/models/{name}/versions/{version}``; binary tensor data and compressed
  bodies: :mod:`deploy.oip_binary`; ``/openapi.json``: :mod:`deploy.openapi_doc`)
- ``GET /v1/model``, ``GET /metrics`` (Prometheus), ``POST /v1/admin/reload`` (bearer token)

The :class:`ModelHolder` polls the bundle store's ``CURRENT`` pointer in a background thread,
loads and warms a new bundle off the request path and swaps one reference. Requests take that
reference once, so in-flight requests finish on the model they started with; a bundle that
fails to load is refused and the old one keeps serving. No torch.

One job a module:

- :mod:`~deploy.server.settings` - :class:`ServerSettings`, frozen and validated
- :mod:`~deploy.server.errors` - errors as ``{"error": ...}`` answers with their status
- :mod:`~deploy.server.body` - reading request bodies and classify images under the limits
- :mod:`~deploy.server.metrics` - the Prometheus registry, the request middleware, ``/metrics``
- :mod:`~deploy.server.holder` - the model being served: load, warm, swap, follow ``CURRENT``
- :mod:`~deploy.server.context` - what the routes of one app share (no module-level state)
- :mod:`~deploy.server.v1` - ``/v1/classify``, ``/v1/model``, ``/v1/admin/reload``
- :mod:`~deploy.server.v2` - the Open Inference Protocol v2 routes
- :mod:`~deploy.server.app` - :func:`create_app` (wiring only) and :func:`serve`

Bytes to model outputs is the Predictor's job (:mod:`deploy.predictor`); the routes read the
request, call it, and write the answer.
"""

from __future__ import annotations

from deploy.server.app import create_app, serve
from deploy.server.errors import ClientGone, HTTPError
from deploy.server.holder import ModelHolder
from deploy.server.metrics import Metrics
from deploy.server.settings import ADMIN_TOKEN_ENV, ServerSettings

__all__ = [
    "ADMIN_TOKEN_ENV",
    "ClientGone",
    "HTTPError",
    "Metrics",
    "ModelHolder",
    "ServerSettings",
    "create_app",
    "serve",
]
