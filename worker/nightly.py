"""The scheduled nightly re-score, once per night whatever runs beat: a unique key per night in the database.

Every beat process (one per machine, or two by mistake) sends the nightly task; the first task to insert the
night's key into `nightly_claims` runs the re-score, every other one finds the key taken and does nothing. A
redelivery or retry of the winning task (same task id) goes on, so a worker dying mid-start loses nothing.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from skinscan.db import session_scope
from skinscan.settings import Settings
from skinscan.tables import NightlyClaim, utcnow

log = logging.getLogger(__name__)


def night_key(settings: Settings, now: datetime, clinic_id: str | None = None, since: datetime | None = None) -> str:
    """Return the claim key of the night a run at `now` belongs to (the UTC day of its scheduled start).

    The schedule time is subtracted first, so a task that waited in the queue past midnight still counts for the
    night it was sent in. A scope other than every clinic and every date gets a key of its own.
    """
    day = (now - timedelta(hours=settings.rescore_hour, minutes=settings.rescore_minute)).date().isoformat()
    scope = "" if clinic_id is None and since is None else f" clinic={clinic_id or '*'} since={since or '*'}"
    return day + scope


def claim_night(settings: Settings, key: str, task_id: str) -> bool:
    """Insert the night's claim for task_id unless one exists; True when task_id holds it (now or from before)."""
    with session_scope(settings) as session:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        session.execute(dialect.insert(NightlyClaim).values(key=key, task_id=task_id, claimed_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["key"]))
        owner = session.scalar(select(NightlyClaim.task_id).where(NightlyClaim.key == key))
    return owner == task_id


def record_run(settings: Settings, key: str, run_id: int | None) -> None:
    """Record which re-score run the night's claim started (None: there was nothing to re-score)."""
    with session_scope(settings) as session:
        claim = session.get(NightlyClaim, key)
        if claim is not None:
            claim.run_id = run_id


def run_nightly(settings: Settings, task_id: str, clinic_id: str | None = None, since: datetime | None = None,
                now: datetime | None = None) -> int | None:
    """Start (or resume) the night's re-score if this task wins the night's claim; return the run id, or None."""
    from worker.rescore import start_rescore

    key = night_key(settings, now or utcnow(), clinic_id, since)
    if not claim_night(settings, key, task_id):
        log.info("nightly re-score %s is claimed by another task already; nothing to do", key)
        return None
    run = start_rescore(settings, clinic_id, since, actor="schedule", requeue_active=False)
    run_id = run.id if run else None
    record_run(settings, key, run_id)
    log.info("nightly re-score %s: %s", key, f"run {run_id}" if run_id else "nothing to re-score")
    return run_id
