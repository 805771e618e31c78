"""What every page blueprint shares: error pages in the site's layout and small request helpers."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from flask import Blueprint, jsonify, render_template
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from web.errors import wants_json

MESSAGES = {
    400: "The request could not be understood.",
    401: "Please sign in.",
    403: "You do not have access to this page.",
    404: "There is nothing here, or it belongs to another clinic.",
    405: "This page does not accept that kind of request.",
    413: "The upload is too large for one request.",
}


def page_error(exc: HTTPException):  # type: ignore[no-untyped-def]
    """Answer an error on a page as HTML in the site's layout (JSON for the pages' own polling routes)."""
    message = MESSAGES.get(exc.code or 500, exc.description or "Something went wrong.")
    if isinstance(exc, CSRFError):
        message = ("The form was sent without a valid security token (it may have expired, or come from "
                   "another site). Reload the page and try again.")
    elif exc.code == 413:
        from web.context import settings
        from web.limits import too_large_message

        message = too_large_message(settings())
        message = message[:1].upper() + message[1:] + ". Split it into several jobs or a smaller zip."
    if wants_json():
        return jsonify({"error": message, "status": exc.code}), exc.code
    return render_template("error.html", code=exc.code, message=message), exc.code


def page_blueprint(name: str) -> Blueprint:
    """Return a blueprint whose errors are answered by page_error (the JSON API keeps its own handlers)."""
    bp = Blueprint(name, __name__)
    for code in MESSAGES:
        bp.register_error_handler(code, page_error)
    bp.register_error_handler(CSRFError, page_error)
    return bp


# Characters left as they are when a `next` path is rebuilt; everything else (controls, spaces, backslashes,
# non-ASCII) is percent-encoded, so a browser cannot read the result as another host.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def safe_next(target: str | None, default: str) -> str:
    """Return a path on this site to go to after sign-in: `target` parsed and rebuilt, else `default`."""
    if not target:
        return default
    try:
        parts = urlsplit(target)
    except ValueError:
        return default
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return default
    path = "/" + quote(parts.path, safe=_PATH_SAFE).lstrip("/")
    return path + ("?" + quote(parts.query, safe=_QUERY_SAFE) if parts.query else "")
