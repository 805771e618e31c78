"""The append-only audit trail: who created, viewed and exported what, and every model change."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from skinscan.tables import AuditEvent, utcnow

log = logging.getLogger(__name__)


def record(
    session: Session,
    action: str,
    actor: str,
    clinic_id: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Write an audit event in the caller's transaction (committed with it): one INSERT, nothing read back.

    A plain INSERT (no RETURNING, no object in the session), so the audit row that every results read writes
    costs one index insert per index of audit_events, whatever the size of the table.
    """
    # The Table, not the entity (no ORM bookkeeping), inline (no RETURNING of the new id).
    session.execute(insert(AuditEvent.__table__).inline().values(
        at=utcnow(), action=action, actor=actor, clinic_id=clinic_id, target_type=target_type, target_id=target_id,
        details=details))
    log.debug("audit %s by %s on %s %s", action, actor, target_type, target_id)
