"""The append-only audit trail: who created, viewed and exported what, and every model change."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from skinscan.tables import AuditEvent

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
    """Add an audit event to the session (committed with the caller's transaction)."""
    session.add(AuditEvent(action=action, actor=actor, clinic_id=clinic_id, target_type=target_type,
                           target_id=target_id, details=details))
    log.debug("audit %s by %s on %s %s", action, actor, target_type, target_id)
