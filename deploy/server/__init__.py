"""The HTTP server (:mod:`deploy.server.app`), a package now; the names other code imports."""

from __future__ import annotations

from deploy.server.app import ADMIN_TOKEN_ENV, ServerSettings, create_app, serve

__all__ = ["ADMIN_TOKEN_ENV", "ServerSettings", "create_app", "serve"]
