"""Refuse request text no database can store (NUL bytes, lone surrogates) before a view queries with it.

An id in the path that cannot be stored names nothing: 404. A query parameter, form field or JSON string that
cannot be stored is a bad request: 400 naming the field. Sign-in checks its own form, so that a refused attempt
still counts against the sign-in throttle (web.ratelimit).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, request

from skinscan.textcheck import unstorable
from web.errors import ApiError, wants_json

SIGNIN_ENDPOINT = "auth.signin"


def _first_unstorable(value: Any, where: str) -> tuple[str, str] | None:
    """(field, problem) of the first string in a JSON value (keys included) that cannot be stored."""
    if isinstance(value, str):
        problem = unstorable(value)
        return (where, problem) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_unstorable(key, f"{where} key") or _first_unstorable(item, f"{where}.{key}"[:80])
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_unstorable(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _refuse(field: str, problem: str) -> None:
    message = f"{field} contains {problem}, which cannot be stored; send plain text"
    if wants_json():
        raise ApiError(message, 400)
    abort(400, description=message)


def check_request_text() -> None:
    """Answer 404 for an unstorable id in the path, 400 for an unstorable query, form or JSON string."""
    for value in (request.view_args or {}).values():
        if isinstance(value, str) and unstorable(value):
            if wants_json():
                raise ApiError("not found", 404)
            abort(404)
    for name, value in request.args.items(multi=True):
        if problem := unstorable(name) or unstorable(value):
            _refuse(f"query parameter {name!r}", problem)
    if request.endpoint == SIGNIN_ENDPOINT:
        return
    # Multipart uploads are left to their views (parsing them here would answer a too-large upload before its
    # view can say which limit it crossed); their text fields (job name, file names) keep printable text only.
    if request.mimetype == "application/x-www-form-urlencoded":
        for name, value in request.form.items(multi=True):
            if problem := unstorable(name) or unstorable(value):
                _refuse(f"form field {name!r}", problem)
    elif request.is_json:
        found = _first_unstorable(request.get_json(silent=True), "JSON body")
        if found:
            _refuse(*found)


def init_app(app: Flask) -> None:
    """Check every request's text after the rate limits have counted it, before its view runs."""
    app.before_request(check_request_text)
