"""Rate limits on the JSON API: a fixed window per minute for each API key (or address, without a valid key).

With REDIS_URL set the counters live in Redis (INCR + EXPIRE), so every web process shares them; embedded, they
live in this process. SKINSCAN_RATE_LIMIT_PER_MINUTE sets the limit (0 turns limiting off). If Redis cannot be
reached the request is let through and a warning logged: an outage of the counter store never locks clinics out.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Protocol

from flask import Flask, Response, current_app, jsonify, request

from skinscan.security import KEY_PREFIX_LEN, clinic_for_key, hash_key
from web.context import db, settings

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
_REDIS_PREFIX = "skinscan:ratelimit:"


class Counter(Protocol):
    """Counts hits of one identity in one window."""

    def hit(self, identity: str, window: int) -> int:
        """Count a hit and return the number of hits of this identity in this window so far."""


class MemoryCounter:
    """Counters in this process (embedded mode: one web process)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._window = -1
        self._lock = threading.Lock()

    def hit(self, identity: str, window: int) -> int:
        """Count a hit in memory; a new window starts every counter again."""
        with self._lock:
            if window != self._window:
                self._counts.clear()
                self._window = window
            self._counts[identity] = self._counts.get(identity, 0) + 1
            return self._counts[identity]


class RedisCounter:
    """Counters in Redis, shared by every web process: INCR, and EXPIRE so a window's key goes away."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def hit(self, identity: str, window: int) -> int:
        """Count a hit in Redis."""
        key = f"{_REDIS_PREFIX}{identity}:{window}"
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, WINDOW_SECONDS * 2)
        count, _ = pipe.execute()
        return int(count)


def counter_for(redis_url: str | None) -> Counter:
    """Return a counter store: Redis when a URL is given (shared by every process), else this process's memory."""
    return RedisCounter(redis_url) if redis_url else MemoryCounter()


def identity() -> str:
    """Whom a request counts against: its API key if the key is valid, else the client address."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() == "bearer" and len(key) >= KEY_PREFIX_LEN and clinic_for_key(db(), key) is not None:
        return "key:" + hash_key(key)[:32]
    address = request.remote_addr or "unknown"
    return "addr:" + hashlib.sha256(address.encode()).hexdigest()[:32]


def check() -> Response | None:
    """Answer 429 (JSON, with Retry-After) when the caller has used up this minute's requests."""
    limit = settings().rate_limit_per_minute
    if limit <= 0 or not request.path.startswith("/api/"):
        return None
    now = time.time()
    window = int(now // WINDOW_SECONDS)
    try:
        count = current_app.extensions["skinscan.ratelimit"].hit(identity(), window)
    except Exception as exc:  # noqa: BLE001 - a counter store outage must not take the API down
        log.warning("rate limit not checked: counter store unreachable (%s)", type(exc).__name__)
        return None
    if count <= limit:
        return None
    retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now + 0.999))
    response = jsonify({"error": f"rate limit exceeded: at most {limit} API requests per minute; "
                                 f"retry in {retry_after} seconds", "status": 429})
    response.status_code = 429
    response.headers["Retry-After"] = str(retry_after)
    response.headers["X-RateLimit-Limit"] = str(limit)
    response.headers["X-RateLimit-Remaining"] = "0"
    return response


def init_app(app: Flask) -> None:
    """Check the rate limit before every API request of the app."""
    app.extensions["skinscan.ratelimit"] = counter_for(app.extensions["skinscan.settings"].redis_url)

    @app.before_request
    def _rate_limit() -> Any:
        return check()
