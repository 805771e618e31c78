"""Rate limits (Flask-Limiter): API requests per key, failed sign-ins per account and per client address.

- The JSON API (every path under /api/): SKINSCAN_RATE_LIMIT_PER_MINUTE requests per minute for each API key, or
  for the client address when a request carries no valid key (0: no limit). Over it the API answers 429 in its
  JSON error format with Retry-After.
- Sign-in (POST /signin): SKINSCAN_SIGNIN_FAILURES_PER_ACCOUNT failed sign-ins per account and
  SKINSCAN_SIGNIN_FAILURES_PER_ADDRESS per client address in SKINSCAN_SIGNIN_WINDOW_SECONDS (0: no limit); over
  either the page answers 429 with Retry-After, even for the right password. Only failures (401) are counted.

The windows are moving windows: no span of a window's length ever admits more than the limit (a fixed window would
let twice the limit through around its edge), and Retry-After is exact. With REDIS_URL set the counters live in
Redis, so every web process shares them; embedded, in this process. If Redis cannot be reached the
counting goes on in this process's memory (Flask-Limiter's in-memory fallback) until Redis answers again: an
outage of the counter store neither locks clinics out nor turns the limits off.

Cost: an API request within its limit costs one Redis round trip and no database query of its own (the key is
checked once per request, shared with `web.auth.require_api_key`); no response headers are added, since they
would cost a second round trip. A refused request reads its window once more for Retry-After. A sign-in POST
reads each of its two windows before the view and, when it failed, counts the failure after it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded, RequestLimit
from sqlalchemy.exc import SQLAlchemyError

from skinscan.security import hash_key
from web.auth import api_clinic, bearer_key
from web.context import settings

log = logging.getLogger(__name__)

SIGNIN_ENDPOINT = "auth.signin"
KEY_PREFIX = "skinscan"
# A Redis that does not answer within this is treated as down (the in-memory fallback counts meanwhile).
REDIS_TIMEOUT_SECONDS = 0.5


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _address() -> str:
    return "addr:" + _digest(request.remote_addr or "unknown")


def api_identity() -> str:
    """Whom an API request counts against: its API key if the key is valid, else the client address."""
    key = bearer_key()
    if key is None:
        return _address()
    try:
        valid = api_clinic() is not None
    except SQLAlchemyError:  # the view's own check of the key answers the database error
        log.warning("rate limit: API key not checked (database unavailable); counting the address")
        return _address()
    return "key:" + hash_key(key)[:32] if valid else _address()


def signin_account() -> str:
    """The account a sign-in attempt names (its email, normalised as the sign-in page does)."""
    return "account:" + _digest(request.form.get("email", "").strip().lower()[:320])


def signin_address() -> str:
    """The client address of a sign-in attempt."""
    return _address()


def retry_after(limit: RequestLimit) -> int:
    """Seconds until the limit admits another request: when the oldest counted request leaves the window."""
    return max(1, math.ceil(limit.window.reset_time - time.time()))


def _api_refused(limit: RequestLimit) -> Response:
    wait = retry_after(limit)
    per_minute = settings().rate_limit_per_minute
    response = jsonify({"error": f"rate limit exceeded: at most {per_minute} API requests per minute; "
                                 f"retry in {wait} seconds", "status": 429})
    response.status_code = 429
    response.headers["Retry-After"] = str(wait)
    response.headers["X-RateLimit-Limit"] = str(limit.limit.amount)
    response.headers["X-RateLimit-Remaining"] = "0"
    return response


def _signin_refused(limit: RequestLimit) -> Response:
    from web.pages.auth import signin_refused

    return signin_refused(retry_after(limit))


def _not_api() -> bool:
    return not request.path.startswith("/api/") or settings().rate_limit_per_minute <= 0


def _not_signin(per: Callable[[], int]) -> Callable[[], bool]:
    return lambda: request.endpoint != SIGNIN_ENDPOINT or request.method != "POST" or per() <= 0


def _failed_signin(response: Response) -> bool:
    return response.status_code in (400, 401)  # 400: an email no account can have (a NUL byte)


def _per_account() -> int:
    return settings().signin_failures_per_account


def _per_address() -> int:
    return settings().signin_failures_per_address


def _signin_limit(per: Callable[[], int]) -> Callable[[], str]:
    return lambda: f"{max(1, per())} per {settings().signin_window_seconds} seconds"


def _limits() -> list[ApplicationLimit]:
    """The API limit and the two sign-in limits, checked before every request (each exempt elsewhere)."""
    return [
        ApplicationLimit(
            lambda: f"{max(1, settings().rate_limit_per_minute)} per minute", key_function=api_identity,
            scope="api", exempt_when=_not_api, on_breach=_api_refused, finalized=True),
        ApplicationLimit(
            _signin_limit(_per_account), key_function=signin_account, scope="signin-account",
            exempt_when=_not_signin(_per_account), deduct_when=_failed_signin, on_breach=_signin_refused,
            finalized=True),
        ApplicationLimit(
            _signin_limit(_per_address), key_function=signin_address, scope="signin-address",
            exempt_when=_not_signin(_per_address), deduct_when=_failed_signin, on_breach=_signin_refused,
            finalized=True),
    ]


def init_app(app: Flask) -> Limiter:
    """Set up the app's limiter: Redis storage when REDIS_URL is set, else this process's memory."""
    redis_url = app.extensions["skinscan.settings"].redis_url
    options: dict[str, Any] = {}  # passed to redis-py (which takes float timeouts)
    if redis_url:
        options = {"socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}
    limiter = Limiter(
        lambda: request.remote_addr or "unknown",  # unused: every limit names its own key function
        application_limits=_limits(),  # type: ignore[arg-type]
        storage_uri=redis_url or "memory://",
        storage_options=options,
        strategy="moving-window",
        key_prefix=KEY_PREFIX,
        headers_enabled=False,
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.init_app(app)
    app.extensions["skinscan.limiter"] = limiter

    @app.errorhandler(RateLimitExceeded)
    def _refused(exc: RateLimitExceeded) -> Response:
        if exc.response is not None:
            return exc.response
        response = jsonify({"error": "rate limit exceeded", "status": 429})
        response.status_code = 429
        return response

    return limiter
