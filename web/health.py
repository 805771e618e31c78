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
    """Readiness: database, broker and storage all reachable (503 naming what is not); "degraded" (200) naming the
    production model when its stored bundle was found unusable (jobs fail until it is registered again)."""
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
    body: dict[str, object] = {"status": "ok" if ok else "unavailable", "checks": checks}
    if ok:
        problem = _production_bundle_problem()
        checks["model"] = "ok" if problem is None else f"error: production bundle {problem[0]} is unusable"
        if problem is not None:
            # This web process still serves pages and results: it stays ready (200), and says what is wrong.
            body["status"], body["model_error"] = "degraded", problem[1]
    return jsonify(body), 200 if ok else 503


def _production_bundle_problem() -> tuple[str, str] | None:
    """(version, error) when a machine found the production model's stored bundle unusable."""
    from skinscan.model.health import production_bundle_problem
    from web.context import db

    return production_bundle_problem(db())
