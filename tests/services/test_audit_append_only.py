"""The audit trail is append-only in the database itself: UPDATE, DELETE and TRUNCATE of audit_events fail on
real PostgreSQL (and UPDATE and DELETE on the embedded SQLite), whatever the application's role may do
(issue 12, point 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError

from skinscan.audit import record
from skinscan.db import get_engine, session_scope
from skinscan.tables import AuditEvent

pytestmark = [pytest.mark.services]


def add_event(settings: Any) -> int:
    """Record one audit event through the application's own code; return its id."""
    with session_scope(settings) as session:
        record(session, "job.create", "api-key:auditor", target_type="job", target_id="job-1")
    with session_scope(settings) as session:
        return session.scalar(select(func.max(AuditEvent.id)))


def assert_refused(settings: Any, statement: Any) -> None:
    """Run a statement in its own transaction and check the database refuses it."""
    with pytest.raises(DBAPIError, match="append-only"), session_scope(settings) as session:
        session.execute(statement)


def assert_unchanged(settings: Any, event_id: int) -> None:
    """The one event is still there as written."""
    with session_scope(settings) as session:
        rows = session.execute(select(AuditEvent.id, AuditEvent.actor, AuditEvent.action)).all()
    assert [tuple(r) for r in rows] == [(event_id, "api-key:auditor", "job.create")]


def test_postgres_refuses_update_delete_truncate_of_audit_events(stack) -> None:  # type: ignore[no-untyped-def]
    """On PostgreSQL as the application connects, editing, deleting or truncating the trail fails; adding works."""
    settings = stack.settings()
    assert get_engine(settings).dialect.name == "postgresql"
    event_id = add_event(settings)
    assert_refused(settings, update(AuditEvent).where(AuditEvent.id == event_id).values(actor="someone-else"))
    assert_refused(settings, delete(AuditEvent).where(AuditEvent.id == event_id))
    assert_refused(settings, delete(AuditEvent))
    assert_refused(settings, text("TRUNCATE audit_events"))
    with pytest.raises(DBAPIError, match="append-only"), session_scope(settings) as session:
        session.get(AuditEvent, event_id).actor = "edited through the ORM"
    assert_unchanged(settings, event_id)


def test_sqlite_refuses_update_and_delete_of_audit_events(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The embedded SQLite database, migrated the same way, refuses editing or deleting the trail too."""
    from skinscan.db import dispose_engines
    from skinscan.migrate import upgrade
    from skinscan.settings import load_settings

    monkeypatch.setenv("SKINSCAN_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.database_url.startswith("sqlite")
    upgrade(settings)
    try:
        event_id = add_event(settings)
        assert_refused(settings, update(AuditEvent).where(AuditEvent.id == event_id).values(actor="x"))
        assert_refused(settings, delete(AuditEvent))
        assert_unchanged(settings, event_id)
    finally:
        dispose_engines()
