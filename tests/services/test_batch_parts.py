"""A numbered upload part is counted by one conditional UPDATE: two requests carrying the same part of one job,
interleaved on PostgreSQL, count it once (the second waits for the first's row lock, then finds it received)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytestmark = [pytest.mark.services]


def test_the_same_part_from_two_connections_is_counted_once(stack) -> None:  # type: ignore[no-untyped-def]
    from conftest import make_clinic
    from sqlalchemy import select

    from skinscan.db import session_scope
    from skinscan.tables import Job
    from web.batches import claim_part

    settings = stack.settings()
    clinic_id, _ = make_clinic(settings, "Parts Clinic")
    with session_scope(settings) as session:
        job = Job(clinic_id=clinic_id, status="uploading", parts=1)
        session.add(job)
        session.flush()
        job_id = job.id

    outcome: dict[str, Any] = {}
    with session_scope(settings) as first:
        assert claim_part(first, job_id, 1) == "new"  # holds the job's row lock until this block commits

        def second() -> None:
            with session_scope(settings) as other:
                outcome["second"] = claim_part(other, job_id, 1)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and "second" not in outcome  # waiting on the row lock, not counting
    thread.join(30)
    assert outcome["second"] == "received"
    with session_scope(settings) as session:
        assert session.scalar(select(Job.parts).where(Job.id == job_id)) == 2
        assert claim_part(session, job_id, 3) == "early"
        assert claim_part(session, job_id, 2) == "new"


def test_two_creates_with_one_batch_key_make_one_job(stack, api, isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Two runs of the same batch create its job at the same moment: both are answered with one job (one 202,
    one 200 resumed), the clinic has one job with that key, and the loser's stored images are not kept."""
    import io

    from sqlalchemy import func, select

    from skinscan.db import session_scope
    from skinscan.tables import ImageRecord, Job

    files, _ = isic_test_images(2)
    key = "k" * 40
    barrier = threading.Barrier(2)
    answers: list[Any] = [None, None]

    def create(i: int) -> None:
        client = api.client.application.test_client()
        barrier.wait()
        answers[i] = client.post("/api/v1/jobs", headers=api.headers(), content_type="multipart/form-data",
                                 data={"files": [(io.BytesIO(b), n) for n, b in files], "finalize": "false",
                                       "batch_key": key})

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(a.status_code for a in answers) == [200, 202], [a.get_json() for a in answers]
    assert answers[0].get_json()["id"] == answers[1].get_json()["id"]
    settings = stack.settings()
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.batch_key == key)) == 1
        assert session.scalar(select(func.count()).select_from(ImageRecord)) == 2


def test_a_create_that_loses_the_batch_key_answers_the_winners_job(stack, api, isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Interleaved: a job with the key is inserted and not yet committed; a create with the same key stores its
    images and waits on the key's unique index; once the first commits, the create is answered with that job
    (200 resumed) and keeps nothing of its own (no image row, no upload intent left)."""
    import io

    from sqlalchemy import func, select

    from skinscan.db import session_scope
    from skinscan.tables import ImageRecord, Job, Upload

    files, _ = isic_test_images(2)
    key = "w" * 40
    settings = stack.settings()
    answer: dict[str, Any] = {}

    def create() -> None:
        client = api.client.application.test_client()
        answer["resp"] = client.post("/api/v1/jobs", headers=api.headers(), content_type="multipart/form-data",
                                     data={"files": [(io.BytesIO(b), n) for n, b in files], "finalize": "false",
                                           "batch_key": key})

    with session_scope(settings) as first:
        winner = Job(clinic_id=api.clinic_id, status="uploading", batch_key=key, parts=1)
        first.add(winner)
        first.flush()
        winner_id = winner.id
        thread = threading.Thread(target=create)
        thread.start()
        thread.join(3.0)
        assert thread.is_alive() and "resp" not in answer  # waiting on the unique key, not answered
    thread.join(60)
    resp = answer["resp"]
    assert resp.status_code == 200 and resp.get_json()["id"] == winner_id and resp.get_json()["resumed"]
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(ImageRecord)) == 0
        assert session.scalar(select(func.count()).select_from(Upload)) == 0
        assert session.scalar(select(func.count()).select_from(Job).where(Job.batch_key == key)) == 1
