"""The status poll's cost: after the first request a process remembers a valid key's clinic for a few seconds, so
a poll is one indexed read of the job row; an unknown key always reaches the database; the memory expires."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event

from skinscan.db import engine_for_url
from web.auth import KEY_CACHE, KeyCache, KeyClinic


@pytest.fixture()
def statements(settings: Any) -> Iterator[list[str]]:
    """Every SQL statement the app runs while the test body runs."""
    seen: list[str] = []
    engine = engine_for_url(settings.database_url)

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    KEY_CACHE.clear()
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)
    KEY_CACHE.clear()


def test_a_poll_is_one_query_once_the_key_is_known(client, api, jpeg, sent, statements) -> None:  # type: ignore[no-untyped-def]
    """First poll: key lookup plus the job; every later poll within the cache time: the job row alone."""
    job_id = api.submit([("ISIC_1.jpg", jpeg())]).get_json()["id"]
    KEY_CACHE.clear()
    statements.clear()
    assert api.get(f"/api/v1/jobs/{job_id}").status_code == 200
    first = list(statements)
    assert any("api_keys" in s for s in first)
    statements.clear()
    for _ in range(3):
        body = api.get(f"/api/v1/jobs/{job_id}").get_json()
        assert body["id"] == job_id
    assert len(statements) == 3, statements
    assert all("FROM jobs" in s and "api_keys" not in s for s in statements), statements


def test_an_unknown_key_is_never_remembered(client, api, statements) -> None:  # type: ignore[no-untyped-def]
    """Each request with a wrong key is checked against the database again, and refused."""
    headers = {"Authorization": "Bearer sk_not-a-real-key-000000000000"}
    for _ in range(2):
        assert client.get("/api/v1/jobs", headers=headers).status_code == 401
    assert sum("api_keys" in s for s in statements) == 2


def test_cache_expires_and_stays_bounded() -> None:
    """An entry is gone after its expiry time; the oldest entries leave when the cache is full."""
    cache = KeyCache(size=2)
    a, b, c = (KeyClinic(id=x, name=x) for x in "abc")
    cache.put("ka", a, expires=10.0)
    assert cache.get("ka", now=9.9) == a
    assert cache.get("ka", now=10.0) is None
    cache.put("ka", a, expires=100.0)
    cache.put("kb", b, expires=100.0)
    cache.get("ka", now=1.0)  # ka is now the most recently used
    cache.put("kc", c, expires=100.0)
    assert cache.get("kb", now=1.0) is None
    assert cache.get("ka", now=1.0) == a and cache.get("kc", now=1.0) == c
