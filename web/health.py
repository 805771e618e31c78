"""Liveness and readiness: /healthz answers if the process runs; /readyz checks database, broker, storage."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify

from web.context import settings, storage

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


def _check_broker() -> None:
    s = settings()
    if s.redis_url is None:
        return
    import redis

    redis.Redis.from_url(s.redis_url, socket_connect_timeout=2, socket_timeout=2).ping()


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Readiness: database, broker and storage all reachable (503 naming what is not)."""
    from skinscan.db import ping

    checks: dict[str, str] = {}
    for name, check in (("database", lambda: ping(settings())), ("broker", _check_broker),
                        ("storage", lambda: storage().check())):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            log.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503
