"""Races between requests and workers on real PostgreSQL, Redis and S3, each interleaved deterministically: the
second connection runs right after a chosen statement of the first, which goes on only once the second has
committed or waits on a lock the first holds."""

from __future__ import annotations

from typing import Any

import pytest
from interleave import after_statement
from realservices import Api
from sqlalchemy import select, update
from test_job_management import noise_jpeg
from test_prediction_writes import _Rules

from skinscan.db import get_engine, session_scope
from skinscan.tables import ImageRecord, Job
from worker.scoring import Scored


def submit(api: Api, n: int, **form: str) -> str:
    """Submit n small images; return the job id."""
    response = api.submit([(f"lesion-{i}.jpg", noise_jpeg(i)) for i in range(n)], **form)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def image_ids(settings: Any, job_id: str) -> list[str]:
    """The job's image ids in upload order."""
    with session_scope(settings) as session:
        return list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
                                    .order_by(ImageRecord.position)))


def job_row(settings: Any, job_id: str) -> Job:
    """The job as committed now."""
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def statuses(settings: Any, job_id: str) -> dict[str, str]:
    """Each image's status."""
    with session_scope(settings) as session:
        return dict(session.execute(select(ImageRecord.id, ImageRecord.status)
                                    .where(ImageRecord.job_id == job_id)).all())


def touches_jobs(statement: str) -> bool:
    """A statement that reads or writes the jobs table."""
    return "FROM jobs" in statement or "UPDATE jobs" in statement


@pytest.mark.services
def test_claim_never_overwrites_a_cancel(stack: Any, api: Api) -> None:
    """A cancel committed while a worker claims a chunk stays cancelled (the claim used to write `running` over it,
    and the refresh after the chunk then marked the job `done`)."""
    from web.job_cancellation import cancel_job
    from worker.pipeline import claim_chunk, refresh_job

    settings = stack.settings()
    job_id = submit(api, 3)
    ids = image_ids(settings, job_id)

    def cancel() -> int:
        with session_scope(settings) as session:
            return cancel_job(session, job_id, "nurse@test")[1]

    with after_statement(get_engine(settings), stack.db.url, touches_jobs, cancel) as other:
        claim_chunk(job_id, ids, settings)
    refresh_job(job_id, settings)  # what the chunk does when it finds nothing left to score
    job = job_row(settings, job_id)
    assert job.status == "cancelled", f"the claim overwrote the cancel: job is {job.status}"
    assert other.results == [3] and set(statuses(settings, job_id).values()) == {"cancelled"}


@pytest.mark.services
def test_claim_counts_failures_by_sql_increment(stack: Any, api: Api) -> None:
    """Images the claim gives up on add to a failure count another chunk moved meanwhile; none is lost."""
    from worker.pipeline import MAX_ATTEMPTS, claim_chunk, record_results

    settings = stack.settings()
    job_id = submit(api, 4)
    a, b, c, _d = ids = image_ids(settings, job_id)
    with session_scope(settings) as session:
        session.execute(update(ImageRecord).where(ImageRecord.id.in_([a, b])).values(attempts=MAX_ATTEMPTS))
    version = job_row(settings, job_id).model_version

    def other_chunk_fails_c() -> None:
        record_results(job_id, _Rules(version), [Scored(c, error="cannot decode")], settings)

    with after_statement(get_engine(settings), stack.db.url, touches_jobs, other_chunk_fails_c):
        claim_chunk(job_id, [a, b], settings)
    job = job_row(settings, job_id)
    assert [statuses(settings, job_id)[i] for i in ids] == ["failed", "failed", "failed", "pending"]
    assert job.failed == 3, f"a concurrent increment was lost: failed = {job.failed}"
