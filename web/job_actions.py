"""Cancelling and deleting the signed-in clinic's jobs: one flow for the JSON API and the pages, each of which
answers in its own format (a refused cancel: 409 or a message; a deletion: its JSON or its sentence)."""

from __future__ import annotations

from flask import g

from skinscan.jobs.cancellation import cancel_job
from skinscan.jobs.deletion import Deletion, delete_job, retry_deleted, was_deleted
from skinscan.tables import Job
from web.context import db, settings, storage
from web.lookup import MAX_ID_LENGTH, not_found, owned_job


def cancel_owned_job(job_id: str) -> tuple[Job, int]:
    """Cancel the clinic's job (404 unless it is theirs): (job, images cancelled now); CancelRefused if it ended."""
    return cancel_job(db(), owned_job(job_id).id, g.actor)


def job_to_delete(job_id: str) -> Job | Deletion:
    """The clinic's job, read once (404 unless it is theirs); for an id whose deletion the clinic's audit trail
    records, what finishing that deletion did (any stored objects it left are removed now)."""
    session = db()
    job = session.get(Job, job_id) if len(job_id) <= MAX_ID_LENGTH else None
    if job is not None and job.clinic_id == g.clinic.id:
        return job
    if job is None and len(job_id) <= MAX_ID_LENGTH and was_deleted(session, g.clinic.id, job_id):
        return retry_deleted(session, storage(), g.clinic.id, job_id)
    not_found("job")


def delete_owned_job(job: Job) -> Deletion:
    """Delete one of the clinic's jobs (job_to_delete), its results and its stored images, audited; of deletions
    running at once one deletes, the others answer as for a job deleted before."""
    return delete_job(db(), storage(), job, g.actor, settings().orphan_grace_seconds)
