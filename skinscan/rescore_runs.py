"""What a re-score run covers and how far it is: its images (read in keyset pages), its chunks and its counters.

A run's images are those in its scope (a clinic or all, uploaded since a date or ever) that had a prediction
before the run began but none from the run's model (`model_to`) then. That set never changes afterwards. The run
is enqueued a page at a time in (created_at, id) order, each page's chunks recorded (RescoreChunk) in the
transaction that moves the run's cursor and adds the page to its totals; a chunk adds its counts to the run (and to
its clinics' rows) in the transaction that first completes it, so a chunk delivered twice counts once and every
step costs O(chunk), whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exists, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from skinscan.tables import ImageRecord, Prediction, RescoreRun, RescoreRunClinic

RUNNING, DONE, SUPERSEDED = "running", "done", "superseded"
ERROR_SAMPLES = 20  # a run keeps the first ERROR_SAMPLES failures with their reason; `failed` counts them all
COUNTERS = ("total", "done", "failed", "changed", "flagged")


def aware(value: datetime) -> datetime:
    """Return a datetime with UTC attached when the database gave it back naive (SQLite)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def has_prediction(version: str, before: datetime | None = None) -> Any:
    """Return an EXISTS clause: the image (correlated) has a prediction of version (made by `before`)."""
    query = select(Prediction.id).where(Prediction.image_id == ImageRecord.id, Prediction.model_version == version)
    if before is not None:
        query = query.where(Prediction.created_at <= before)
    return exists(query)


@dataclass(frozen=True)
class Scope:
    """What a run covers: its clinic (or all), uploaded since (or ever), not yet scored by model_to at started_at."""

    model_to: str
    started_at: datetime
    clinic_id: str | None = None
    since: datetime | None = None

    @classmethod
    def of(cls, run: RescoreRun) -> Scope:
        """The scope of a run."""
        return cls(run.model_to, run.started_at, run.clinic_id, run.since)


def scope_query(scope: Scope) -> Any:
    """Return a SELECT of (id, created_at, clinic_id) of the scope's images, in (created_at, id) order."""
    scored_before = exists(select(Prediction.id).where(Prediction.image_id == ImageRecord.id,
                                                       Prediction.created_at <= scope.started_at))
    query = (select(ImageRecord.id, ImageRecord.created_at, ImageRecord.clinic_id)
             .where(scored_before, ~has_prediction(scope.model_to, scope.started_at)))
    if scope.clinic_id is not None:
        query = query.where(ImageRecord.clinic_id == scope.clinic_id)
    if scope.since is not None:
        query = query.where(ImageRecord.created_at >= scope.since)
    return query.order_by(ImageRecord.created_at, ImageRecord.id)


def scope_page(session: Session, scope: Scope, after: tuple[datetime, str] | None,
               limit: int) -> list[tuple[str, datetime, str]]:
    """Return the next `limit` images of the scope after the keyset position (created_at, id), in order."""
    query = scope_query(scope)
    if after is not None:
        query = query.where(tuple_(ImageRecord.created_at, ImageRecord.id) > tuple_(*after))
    return [(i, c, k) for i, c, k in session.execute(query.limit(limit))]


def scope_is_empty(session: Session, scope: Scope) -> bool:
    """True when no image is in the scope (read with LIMIT 1: stops at the first one)."""
    return session.execute(scope_query(scope).limit(1)).first() is None


def dialect_insert(session: Session) -> Any:
    """INSERT of the session's dialect (PostgreSQL or SQLite), for ON CONFLICT clauses."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def add_clinic_counts(session: Session, run_id: int, counts: Mapping[str, Mapping[str, int]]) -> None:
    """Add {clinic id: {counter: n}} to the run's per-clinic rows (created on first use), in one round trip."""
    rows = [{"run_id": run_id, "clinic_id": clinic, **{c: int(add.get(c, 0)) for c in COUNTERS}}
            for clinic, add in counts.items() if any(add.values())]
    if not rows:
        return
    table = RescoreRunClinic.__table__
    stmt = dialect_insert(session)(table)
    stmt = stmt.on_conflict_do_update(index_elements=["run_id", "clinic_id"],
                                      set_={c: table.c[c] + stmt.excluded[c] for c in COUNTERS})
    session.execute(stmt, rows)  # executemany of one cached statement


def bounded_errors(current: Mapping[str, str] | None, new: Mapping[str, str],
                   limit: int = ERROR_SAMPLES) -> dict[str, str]:
    """Return the error samples after adding new ones: the first `limit` kept, later ones only counted elsewhere."""
    kept = dict(current or {})
    for image_id, error in new.items():
        if len(kept) >= limit:
            break
        kept.setdefault(image_id, error)
    return kept


def list_runs(session: Session, clinic_id: str | None = None, limit: int = 20) -> list[RescoreRun]:
    """Return the newest runs (those that covered a clinic's images, when one is named)."""
    query = select(RescoreRun)
    if clinic_id is not None:
        query = query.where(or_(RescoreRun.clinic_id.is_(None), RescoreRun.clinic_id == clinic_id))
    return list(session.scalars(query.order_by(RescoreRun.started_at.desc(), RescoreRun.id.desc()).limit(limit)))


def clinic_counts(session: Session, run_ids: Iterable[int], clinic_id: str) -> dict[int, dict[str, int]]:
    """Return {run id: counters} of one clinic's images in these runs, in one query (zeros where none)."""
    ids = list(run_ids)
    found = {r.run_id: {c: getattr(r, c) for c in COUNTERS} for r in session.scalars(
        select(RescoreRunClinic).where(RescoreRunClinic.run_id.in_(ids), RescoreRunClinic.clinic_id == clinic_id))
    } if ids else {}
    return {i: found.get(i, dict.fromkeys(COUNTERS, 0)) for i in ids}


def run_summaries(session: Session, runs: list[RescoreRun], clinic_id: str | None = None) -> list[dict[str, Any]]:
    """Return runs as JSON (counted for one clinic when one is named): two queries whatever the number of runs."""
    per_clinic = clinic_counts(session, [r.id for r in runs], clinic_id) if clinic_id is not None else {}
    return [_summary(run, per_clinic.get(run.id)) for run in runs]


def run_summary(session: Session, run: RescoreRun, clinic_id: str | None = None) -> dict[str, Any]:
    """Return a run as JSON: scope, models, progress and summary (counted for one clinic when one is named)."""
    return run_summaries(session, [run], clinic_id)[0]


def _summary(run: RescoreRun, counts: dict[str, int] | None) -> dict[str, Any]:
    def ts(value: datetime | None) -> str | None:
        return aware(value).isoformat() if value else None

    c = counts if counts is not None else {name: getattr(run, name) for name in COUNTERS}
    total, done, failed = c["total"], c["done"], c["failed"]
    return {
        "id": run.id, "status": run.status, "model_from": run.model_from, "model_to": run.model_to,
        "scope": {"clinic": run.clinic_id is not None, "since": ts(run.since)},
        "images": total, "done": done, "failed": failed,
        "progress": 1.0 if total == 0 else round(min(1.0, (done + failed) / total), 4),
        "changed": c["changed"], "flagged": c["flagged"],
        "started_at": ts(run.started_at), "finished_at": ts(run.finished_at), "duration_s": run.duration_s,
    }
