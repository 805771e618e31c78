"""Rate limits on the embedded defaults (Flask-Limiter, in-memory storage): moving windows for sign-in, the API's
429 in its JSON error format, every /api/ route limited, and no database query added by the limiter."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import limits.storage.memory
import pytest
from flask import Flask
from realservices import Api
from sqlalchemy import event
from test_pages_fast import make_user, sign_in
from tests_helpers import replace

import web.ratelimit
from skinscan.db import get_engine


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A settable clock for the in-memory counters and Retry-After (value [0], seconds since the epoch)."""
    now = [1_000_000.0]
    fake = SimpleNamespace(time=lambda: now[0])
    monkeypatch.setattr(limits.storage.memory, "time", fake)
    monkeypatch.setattr(web.ratelimit, "time", fake)
    return now


def test_signin_window_moves(settings: Any, clock: list[float]) -> None:
    """Failures just before a window's edge still count just after it: no span of one window admits more than the
    limit, and Retry-After says when the oldest failure leaves the window."""
    from web import create_app

    app = create_app(replace(settings, signin_failures_per_account=3, signin_failures_per_address=100,
                             signin_window_seconds=100), {"TESTING": True})
    _c, _k, email = make_user(settings)
    client = app.test_client()
    assert [sign_in(client, email, "wrong").status_code for _ in range(3)] == [401] * 3
    clock[0] += 60
    refused = sign_in(client, email)
    assert refused.status_code == 429 and 40 <= int(refused.headers["Retry-After"]) <= 41
    assert "Too many failed sign-ins" in refused.text
    clock[0] += 39  # 99 s after the first failure: still inside its window
    assert sign_in(client, email).status_code == 429
    clock[0] += 2
    assert sign_in(client, email).status_code == 302  # the right password, once the failures have left the window


def test_signin_counts_only_failures_and_per_address(settings: Any, clock: list[float]) -> None:
    """Successful sign-ins are not counted; an address reaching its limit is refused for every account."""
    from web import create_app

    app = create_app(replace(settings, signin_failures_per_account=100, signin_failures_per_address=2),
                     {"TESTING": True})
    _c, _k, alice = make_user(settings)
    _c2, _k2, bob = make_user(settings)
    assert all(sign_in(app.test_client(), alice).status_code == 302 for _ in range(4))
    attacker = app.test_client()
    assert [sign_in(attacker, alice, "x").status_code, sign_in(attacker, bob, "y").status_code] == [401, 401]
    assert sign_in(attacker, bob).status_code == 429
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "198.51.100.4"
    assert sign_in(elsewhere, bob).status_code == 302


def test_api_429_is_the_api_error_format(settings: Any, new_api: Callable[[], Api], clock: list[float]) -> None:
    """The refusal is JSON {"error", "status"} with Retry-After and the limit; the key may go on a minute after
    its first request."""
    from web import create_app

    client = create_app(replace(settings, rate_limit_per_minute=2), {"TESTING": True}).test_client()
    key = new_api().key
    api = Api(client, key, "")
    assert [api.get("/api/v1/jobs").status_code for _ in range(2)] == [200, 200]
    clock[0] += 30
    refused = api.get("/api/v1/jobs")
    assert refused.status_code == 429 and refused.is_json
    body = refused.get_json()
    assert body["status"] == 429 and body["error"].startswith("rate limit exceeded: at most 2 API requests")
    assert 30 <= int(refused.headers["Retry-After"]) <= 31 and refused.headers["X-RateLimit-Limit"] == "2"
    assert refused.headers["X-Content-Type-Options"] == "nosniff"
    clock[0] += 31
    assert api.get("/api/v1/jobs").status_code == 200


def test_every_api_route_shares_the_key_limit(settings: Any, new_api: Callable[[], Api], clock: list[float]) -> None:
    """One limit per key over the whole API, whichever routes it calls (also the unauthenticated document);
    pages are not counted."""
    from web import create_app

    app = create_app(replace(settings, rate_limit_per_minute=3), {"TESTING": True})
    api = Api(app.test_client(), new_api().key, "")
    codes = [api.get(path).status_code for path in ("/api/v1/jobs", "/api/v1/models", "/api/v1/openapi.json",
                                                     "/api/v1/rescore-runs")]
    assert codes == [200, 200, 200, 429]
    assert api.client.get("/signin").status_code == 200 and api.client.get("/healthz").status_code == 200


def _statements(app: Flask, settings: Any, headers: dict[str, str]) -> int:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert app.test_client().get("/api/v1/jobs", headers=headers).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen)


def test_limiter_adds_no_database_query(settings: Any, new_api: Callable[[], Api]) -> None:
    """The key is looked up once per request, for the limit and the view together."""
    from web import create_app

    headers = new_api().headers()
    uncached = replace(settings, api_key_cache_seconds=0)  # every request looks its key up
    limited = create_app(replace(uncached, rate_limit_per_minute=1000), {"TESTING": True})
    unlimited = create_app(replace(uncached, rate_limit_per_minute=0), {"TESTING": True})
    assert _statements(limited, settings, headers) == _statements(unlimited, settings, headers)


def _client_at(app: Flask, remote: str, forwarded_for: str) -> Any:
    """A test client connecting from `remote` (the load balancer) and sending X-Forwarded-For."""
    client = app.test_client()
    client.environ_base.update(REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded_for)
    return client


def _signins_from(app: Flask, email: str, forwarded_for: str) -> list[int]:
    """Two wrong passwords then the right one, from one client behind the balancer at 10.0.0.1."""
    client = _client_at(app, "10.0.0.1", forwarded_for)
    return [sign_in(client, email, "wrong").status_code, sign_in(client, email, "wrong").status_code,
            sign_in(client, email).status_code]


def test_forwarded_for_ignored_without_trusted_proxies(settings: Any) -> None:
    """SKINSCAN_TRUSTED_PROXIES=0 (the default): a spoofed X-Forwarded-For does not escape the address throttle."""
    from web import create_app

    app = create_app(replace(settings, signin_failures_per_account=100, signin_failures_per_address=2),
                     {"TESTING": True})
    _c, _k, email = make_user(settings)
    assert _signins_from(app, email, "203.0.113.1") == [401, 401, 429]
    assert sign_in(_client_at(app, "10.0.0.1", "203.0.113.2"), email).status_code == 429  # a new "address", same client


def test_one_trusted_proxy_throttles_clients_apart(settings: Any) -> None:
    """SKINSCAN_TRUSTED_PROXIES=1: two clients behind one load balancer are counted by their own addresses, so one
    client's failures do not lock the other out; a client cannot hide behind an address it prepends itself."""
    from web import create_app

    app = create_app(replace(settings, signin_failures_per_account=100, signin_failures_per_address=2,
                             trusted_proxies=1), {"TESTING": True})
    _c, _k, email = make_user(settings)
    assert _signins_from(app, email, "203.0.113.1") == [401, 401, 429]
    assert sign_in(_client_at(app, "10.0.0.1", "203.0.113.2"), email).status_code == 302
    # The attacker prepends a fake entry: the balancer appends the real one, which is the one believed.
    assert sign_in(_client_at(app, "10.0.0.1", "198.51.100.9, 203.0.113.1"), email).status_code == 429
