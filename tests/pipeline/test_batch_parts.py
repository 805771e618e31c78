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
