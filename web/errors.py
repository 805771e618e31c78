"""JSON error answers for the API: a clear message and the right status, never an HTML page or a trace."""

from __future__ import annotations

import logging

from flask import Flask, abort, jsonify, request
from werkzeug.exceptions import HTTPException

from web.context import close_db

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as JSON {"error": message, "details": [...]} with an HTTP status."""

    def __init__(self, message: str, status: int = 400, details: list[dict[str, object]] | None = None) -> None:
        self.message, self.status, self.details = message, status, details or []
        super().__init__(message)


def wants_json() -> bool:
    """True for API calls and clients that prefer JSON."""
    return request.path.startswith("/api/") or request.path in ("/healthz", "/readyz") or (
        request.accept_mimetypes.best == "application/json")


def register(app: Flask) -> None:
    """Install error handlers and the session teardown."""
    app.teardown_appcontext(close_db)

    @app.before_request
    def _refuse_nul_in_headers() -> None:
        # gunicorn refuses these itself (web.gunicorn_conf answers JSON); Werkzeug's server passes them on.
        if any("\x00" in name or "\x00" in value for name, value in request.headers.items()):
            abort(400, description="bad request: a request header contains a NUL byte")

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):  # type: ignore[no-untyped-def]
        body: dict[str, object] = {"error": exc.message, "status": exc.status}
        if exc.details:
            body["details"] = exc.details
        return jsonify(body), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        if not wants_json():
            return exc
        message = {413: "upload too large", 404: "not found", 405: "method not allowed"}.get(
            exc.code or 500, exc.description or exc.name)
        if exc.code == 413:
            from web.context import settings
            from web.limits import too_large_message

            message = too_large_message(settings())
        return jsonify({"error": message, "status": exc.code}), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error on %s %s", request.method, request.path)
        if not wants_json():
            return "Internal server error", 500
        return jsonify({"error": "internal server error", "status": 500}), 500
