"""gunicorn settings for `skinscan web`: the answers gunicorn writes itself are JSON, like the API's errors.

gunicorn refuses a malformed request (a NUL byte in a header, a bad request line) before the app sees it, with a
small HTML page; API clients get {"error": ..., "status": ...} with the same status instead.
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util

_HEADERS = ("Connection: close\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            "X-Frame-Options: DENY\r\nContent-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n")


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Write gunicorn's own error answer as JSON (stands in for gunicorn.util.write_error)."""
    error = f"{reason.lower()}: {mesg}" if mesg else reason.lower()
    body = json.dumps({"error": error, "status": status_int}).encode()  # ASCII: control bytes are escaped
    head = f"HTTP/1.1 {status_int} {reason}\r\n{_HEADERS}Content-Length: {len(body)}\r\n\r\n"
    util.write_nonblock(sock, head.encode("latin-1") + body)


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: in each worker process, answer malformed requests with JSON."""
    util.write_error = write_json_error
