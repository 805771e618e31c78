"""Whether a registered model's stored bundle can be used: a machine that finds it damaged records why, so that
jobs fail with that reason at once and the Model page and /readyz say so; storing it again clears it."""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from skinscan.db import session_scope
from skinscan.settings import Settings
from skinscan.tables import ModelVersion, utcnow

log = logging.getLogger(__name__)


def unusable_reason(error: Exception | str) -> str:
    """The reason an image or job shows when the model bundle cannot be used."""
    return f"the model bundle cannot be used: {error}"[:500]


def record_unusable(settings: Settings, version: str, error: str) -> None:
    """Record (in its own transaction) that a version's stored bundle is unusable, and why."""
    with session_scope(settings) as session:
        session.execute(update(ModelVersion).where(ModelVersion.version == version)
                        .values(bundle_error=error[:1000], bundle_error_at=utcnow()))
    log.error("model %s: stored bundle unusable: %s", version, error)


def clear_unusable(session: Session, version: str) -> None:
    """Forget a version's bundle error (its bundle was stored again, or fetched and verified intact)."""
    session.execute(update(ModelVersion).where(ModelVersion.version == version,
                                               ModelVersion.bundle_error.is_not(None))
                    .values(bundle_error=None, bundle_error_at=None))


def production_bundle_problem(session: Session) -> tuple[str, str] | None:
    """(version, error) when the production model's stored bundle was found unusable, else None."""
    row = session.execute(select(ModelVersion.version, ModelVersion.bundle_error)
                          .where(ModelVersion.status == "production", ModelVersion.bundle_error.is_not(None))).first()
    return (row[0], row[1]) if row else None
