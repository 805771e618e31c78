"""The rate limits on a real Redis: one limit shared by two web processes, one Redis round trip per API request and
no database query of the limiter's own, and counting in memory while Redis is down."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from private_services import Client, RedisServer, make_client
from realservices import ROOT
from sqlalchemy import event
from tests_helpers import replace

from skinscan.db import get_engine

pytestmark = [pytest.mark.services]

# A second web process: its own interpreter and app on the stack's environment, sending `count` API requests.
SECOND_PROCESS = """
import json, sys
from skinscan.settings import load_settings
from web import create_app
client = create_app(load_settings()).test_client()
auth = {"Authorization": "Bearer " + sys.argv[1]}
print(json.dumps([client.get("/api/v1/jobs", headers=auth).status_code for _ in range(int(sys.argv[2]))]))
"""


def _second_process(env: dict[str, str], key: str, count: int) -> list[int]:
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, key, str(count)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_two_processes_share_one_limit(stack) -> None:  # type: ignore[no-untyped-def]
    """Another process's requests count against the same key: 5 per minute in all, then 429 in both processes;
    another key is unaffected."""
    env = {**stack.env, "SKINSCAN_RATE_LIMIT_PER_MINUTE": "5"}
    settings = replace(stack.settings(), rate_limit_per_minute=5)
    here = make_client(settings)
    other_clinic = make_client(settings)
    assert _second_process(env, here.key, 3) == [200] * 3
    assert [here.get("/api/v1/jobs").status_code for _ in range(3)] == [200, 200, 429]
    refused = here.get("/api/v1/jobs")
    assert refused.get_json()["status"] == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert _second_process(env, here.key, 2) == [429, 429]
    assert other_clinic.get("/api/v1/jobs").status_code == 200
    keys = redis.Redis.from_url(stack.redis_url).keys("*skinscan*")
    assert keys, "the counters live in the stack's Redis database"


# What the moving window's Lua script runs inside Redis (one EVALSHA: one round trip).
SCRIPT_COMMANDS = {"lindex", "lpush", "ltrim", "expire"}


def _round_trips(server: redis.Redis) -> dict[str, int]:
    """Commands clients sent since the last reset (those run inside a script left out), then reset the counts."""
    stats = server.info("commandstats")
    server.config_resetstat()
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    return {name: n for name, n in calls.items() if name not in SCRIPT_COMMANDS and not name.startswith("config")}


def test_one_redis_round_trip_and_no_query_of_its_own(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An API request within its limit sends one command to Redis; the limiter adds no database query (the key is
    looked up once, for the limit and the view together)."""
    private = RedisServer(tmp_path)
    try:
        settings = replace(stack.settings(), redis_url=private.url, rate_limit_per_minute=1000)
        limited = make_client(settings)
        unlimited = Client(_app(replace(settings, rate_limit_per_minute=0)), limited.key, limited.clinic_id,
                           settings)
        server = redis.Redis.from_url(private.url)
        assert limited.get("/api/v1/jobs").status_code == 200  # loads the limiter's script once
        _round_trips(server)
        for _ in range(5):
            assert limited.get("/api/v1/jobs").status_code == 200
        assert _round_trips(server) == {"evalsha": 5}
        assert _queries(settings, lambda: limited.get("/api/v1/jobs")) == _queries(
            settings, lambda: unlimited.get("/api/v1/jobs"))
    finally:
        private.stop()


def _app(settings: Any) -> Any:
    from web import create_app

    return create_app(settings).test_client()


def _queries(settings: Any, request: Any) -> int:
    """Number of SQL statements the engine runs for one request."""
    statements: list[str] = []
    engine = get_engine(settings)

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert request().status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(statements)


def test_redis_down_counts_in_memory_then_recovers(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With Redis down the process counts on its own (the limit holds, nothing is locked out); when Redis is back
    the shared counters are used again."""
    private = RedisServer(tmp_path)
    settings = replace(stack.settings(), redis_url=private.url, rate_limit_per_minute=3)
    client = make_client(settings)
    try:
        assert client.get("/api/v1/jobs").status_code == 200
        private.stop()
        assert [client.get("/api/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]
        private.start()
        # Flask-Limiter tries Redis again after a back-off (2, 4, ... s); the new, empty Redis counts from zero.
        deadline = time.monotonic() + 20
        while client.get("/api/v1/jobs").status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert redis.Redis.from_url(private.url).keys("*skinscan*"), "counting went back to Redis"
    finally:
        private.stop()
