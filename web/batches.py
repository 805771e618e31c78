"""A client's batch key (`skinscan submit` derives it from the files' hashes): sending the same batch again finds
its job instead of making another, and a part sent twice is stored once."""

from __future__ import annotations

import re
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from skinscan.tables import Job
from web.errors import ApiError

BATCH_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")


def batch_key_arg(value: str | None) -> str | None:
    """The batch_key field or parameter, checked: 16 to 64 letters, digits, '-' or '_' (400 otherwise)."""
    if value is None or value == "":
        return None
    if not BATCH_KEY.fullmatch(value):
        raise ApiError("batch_key must be 16 to 64 letters, digits, '-' or '_'", 400)
    return value


def part_arg(value: str | None) -> int | None:
    """The part field: the 0-based number of an upload part (the first went with the job's creation)."""
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) > 1_000_000:
        raise ApiError("part must be a whole number from 0", 400)
    return int(value)


def job_for_batch(session: Session, clinic_id: str, key: str) -> Job | None:
    """The clinic's job of this batch, if one can go on; a cancelled job, or a failed one with nothing scored,
    gives its key up (the same batch then makes a new job)."""
    job = session.scalars(select(Job).where(Job.clinic_id == clinic_id, Job.batch_key == key)).first()
    if job is None:
        return None
    if job.status == "cancelled" or (job.status == "failed" and job.scored == 0):
        session.execute(update(Job).where(Job.id == job.id, Job.batch_key == key).values(batch_key=None))
        session.commit()
        return None
    return job


def claim_part(session: Session, job_id: str, part: int | None) -> Literal["new", "received", "early"]:
    """Count an upload part of an uploading job, in this transaction: "new" to store it; "received" when that part
    came before (a retry: store nothing); "early" when an earlier part is missing.

    One conditional UPDATE (it holds the job's row lock until commit): of two requests carrying the same part,
    one counts it and the other, after the first commits, finds it received.
    """
    if part is None:  # a client that does not number its parts: every part is new
        session.execute(update(Job).where(Job.id == job_id).values(parts=Job.parts + 1))
        return "new"
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == "uploading", Job.parts == part)
                           .values(parts=Job.parts + 1).execution_options(synchronize_session=False))
    if done.rowcount == 1:  # type: ignore[attr-defined]
        return "new"
    received = session.scalar(select(Job.parts).where(Job.id == job_id).execution_options(populate_existing=True))
    return "received" if part < (received or 0) else "early"
