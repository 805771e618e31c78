"""Rate limits on the JSON API: a fixed window per minute for each API key (or address, without a valid key).

With REDIS_URL set the counters live in Redis (INCR + EXPIRE), so every web process shares them; embedded, they
live in this process. SKINSCAN_RATE_LIMIT_PER_MINUTE sets the limit (0 turns limiting off). If Redis cannot be
reached the request is let through and a warning logged: an outage of the counter store never locks clinics out.

Sign-in on the pages is throttled on the same counters (SignInThrottle): failed sign-ins per account and per
client address in a window of SKINSCAN_SIGNIN_WINDOW_SECONDS; over SKINSCAN_SIGNIN_FAILURES_PER_ACCOUNT or
SKINSCAN_SIGNIN_FAILURES_PER_ADDRESS the page answers 429 with Retry-After until the window ends.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Protocol

from flask import Flask, Response, current_app, jsonify, request

from skinscan.security import KEY_PREFIX_LEN, clinic_for_key, hash_key
from skinscan.settings import Settings
from web.context import db, settings

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
_REDIS_PREFIX = "skinscan:ratelimit:"
_SIGNIN_PREFIX = "skinscan:signin-failures:"


class Counter(Protocol):
    """Counts hits of one identity in one window."""

    def hit(self, identity: str, window: int) -> int:
        """Count a hit and return the number of hits of this identity in this window so far."""

    def count(self, identity: str, window: int) -> int:
        """Return the number of hits of this identity in this window so far, without counting one."""


class MemoryCounter:
    """Counters in this process (embedded mode: one web process); the current and the previous window are kept."""

    def __init__(self) -> None:
        self._windows: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    def _counts(self, window: int) -> dict[str, int]:
        for old in [w for w in self._windows if w < window - 1]:
            del self._windows[old]
        return self._windows.setdefault(window, {})

    def hit(self, identity: str, window: int) -> int:
        """Count a hit in memory; a new window starts every counter again."""
        with self._lock:
            counts = self._counts(window)
            counts[identity] = counts.get(identity, 0) + 1
            return counts[identity]

    def count(self, identity: str, window: int) -> int:
        """Return a window's hits of an identity in memory."""
        with self._lock:
            return self._windows.get(window, {}).get(identity, 0)


class RedisCounter:
    """Counters in Redis, shared by every web process: INCR, and EXPIRE so a window's key goes away."""

    def __init__(self, url: str, prefix: str = _REDIS_PREFIX, window_seconds: int = WINDOW_SECONDS) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.prefix, self.window_seconds = prefix, window_seconds

    def hit(self, identity: str, window: int) -> int:
        """Count a hit in Redis."""
        key = f"{self.prefix}{identity}:{window}"
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.window_seconds * 2)
        count, _ = pipe.execute()
        return int(count)

    def count(self, identity: str, window: int) -> int:
        """Return a window's hits of an identity in Redis (a window's key lives two windows)."""
        return int(self.client.get(f"{self.prefix}{identity}:{window}") or 0)


def counter_for(redis_url: str | None, prefix: str = _REDIS_PREFIX, window_seconds: int = WINDOW_SECONDS) -> Counter:
    """Return a counter store: Redis when a URL is given (shared by every process), else this process's memory."""
    return RedisCounter(redis_url, prefix, window_seconds) if redis_url else MemoryCounter()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def identity() -> str:
    """Whom a request counts against: its API key if the key is valid, else the client address."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() == "bearer" and len(key) >= KEY_PREFIX_LEN and clinic_for_key(db(), key) is not None:
        return "key:" + hash_key(key)[:32]
    return "addr:" + _digest(request.remote_addr or "unknown")


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


class SignInThrottle:
    """Failed sign-ins counted per account and per client address in fixed windows; over either limit, wait.

    The counters are shared through Redis like the API's; while Redis cannot be reached this process's own
    counters stand in, so an outage of the counter store never turns the throttle off.
    """

    def __init__(self, settings: Settings) -> None:
        self.per_account = settings.signin_failures_per_account
        self.per_address = settings.signin_failures_per_address
        self.window_seconds = max(1, settings.signin_window_seconds)
        self.store = counter_for(settings.redis_url, _SIGNIN_PREFIX, self.window_seconds)
        self.fallback = MemoryCounter()

    def _limits(self, email: str, address: str) -> list[tuple[str, int]]:
        limits = []
        if self.per_account > 0:
            limits.append(("account:" + _digest(email), self.per_account))
        if self.per_address > 0:
            limits.append(("addr:" + _digest(address), self.per_address))
        return limits

    def _apply(self, op: str, identity: str, window: int) -> int:
        try:
            return int(getattr(self.store, op)(identity, window))
        except Exception as exc:  # noqa: BLE001 - the store is down: count in this process instead
            log.warning("sign-in throttle: counter store unreachable (%s); counting in this process",
                        type(exc).__name__)
            return int(getattr(self.fallback, op)(identity, window))

    def retry_after(self, email: str, address: str) -> int:
        """Return the seconds to wait before this account may sign in from this address again (0: go ahead).

        Failures of the previous window count too, so no span of one window length ever admits more than the
        limit (a fixed window alone would let twice the limit through around its edge).
        """
        now = time.time()
        window = int(now // self.window_seconds)
        until = 0
        for identity, limit in self._limits(email, address):
            current = self._apply("count", identity, window)
            if current >= limit:  # still over the limit while this window is the previous one
                until = max(until, window + 2)
            elif current + self._apply("count", identity, window - 1) >= limit:
                until = max(until, window + 1)
        return max(1, int(until * self.window_seconds - now + 0.999)) if until else 0

    def failed(self, email: str, address: str) -> None:
        """Count a failed sign-in against the account and against the address."""
        window = int(time.time() // self.window_seconds)
        for identity, _ in self._limits(email, address):
            self._apply("hit", identity, window)


def signin_throttle() -> SignInThrottle:
    """Return the app's sign-in throttle."""
    return current_app.extensions["skinscan.signin_throttle"]  # type: ignore[no-any-return]


def init_app(app: Flask) -> None:
    """Check the rate limit before every API request of the app; set up the sign-in throttle."""
    app.extensions["skinscan.ratelimit"] = counter_for(app.extensions["skinscan.settings"].redis_url)
    app.extensions["skinscan.signin_throttle"] = SignInThrottle(app.extensions["skinscan.settings"])

    @app.before_request
    def _rate_limit() -> Any:
        return check()
