"""Cancelling and deleting the signed-in clinic's jobs: one flow for the JSON API and the pages, each of which
answers in its own format (a refused cancel: 409 or a message; a deletion: its JSON or its sentence)."""

from __future__ import annotations

from flask import g

from skinscan.jobs.cancellation import cancel_job
from skinscan.jobs.deletion import Deletion, delete_job, retry_deleted, was_deleted
from skinscan.tables import Job
from web.context import db, settings, storage
from web.lookup import MAX_ID_LENGTH, owned_job


def cancel_owned_job(job_id: str) -> tuple[Job, int]:
    """Cancel the clinic's job (404 unless it is theirs): (job, images cancelled now); CancelRefused if it ended."""
    return cancel_job(db(), owned_job(job_id).id, g.actor)


def deleted_before(job_id: str) -> Deletion | None:
    """For an id whose deletion the clinic's audit trail records: remove any objects it left, say what is left."""
    session = db()
    if len(job_id) > MAX_ID_LENGTH or session.get(Job, job_id) is not None \
            or not was_deleted(session, g.clinic.id, job_id):
        return None
    return retry_deleted(session, storage(), g.clinic.id, job_id)


def delete_owned_job(job: Job) -> Deletion:
    """Delete one of the clinic's jobs (owned_job), its results and its stored images, audited."""
    return delete_job(db(), storage(), job, g.actor, settings().orphan_grace_seconds)
