"""Retention on the real services: a clinic's setting, the nightly task in a Celery worker deleting the jobs past
it through the manual delete path (objects on the S3 server, rows in PostgreSQL, one audit event per job) a
bounded batch per task, the Jobs page saying when each job goes, and a job under review at the cut-off."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from private_services import make_client
from realservices import Api
from sqlalchemy import select, text, update
from test_job_management import bucket_keys, job_counts, noise_jpeg
from test_web_pages import Staff, make_user

from skinscan.db import session_scope
from skinscan.tables import AuditEvent, Clinic, ImageRecord, Job, Review

pytestmark = pytest.mark.services


def set_retention(stack: Any, monkeypatch: pytest.MonkeyPatch, clinic_id: str, days: int | None) -> str:
    """Set a clinic's retention with the `skinscan clinics retention` command; return what it printed."""
    import contextlib
    import io

    from skinscan.cli import main
    from skinscan.settings import load_settings

    with session_scope(stack.settings()) as session:
        name = session.get(Clinic, clinic_id).name
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    load_settings.cache_clear()  # the command reads them
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["clinics", "retention", name, *(["--keep"] if days is None else ["--days", str(days)])]) == 0
    return out.getvalue()


def backdate(settings: Any, job_id: str, created_at: datetime) -> None:
    """Move a job's upload time into the past."""
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(created_at=created_at))


def deletions(settings: Any) -> dict[str, AuditEvent]:
    """The job.delete audit events by job id."""
    with session_scope(settings) as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "job.delete")))
        session.expunge_all()
    return {r.target_id: r for r in rows}


@pytest.mark.slow
def test_nightly_task_in_a_worker_deletes_jobs_past_retention_a_batch_per_task(
        stack: Any, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clinic A keeps jobs 30 days, clinic B keeps them: the retention task, sent as beat sends it and run by a
    Celery worker consuming only the low-priority queue, deletes A's two jobs past 30 days (objects, rows, one
    `job.delete` event each by `retention`) in tasks of one job each, and leaves A's 29-day-old job and B's
    400-day-old job with every object."""
    from skinscan.broker import celery_for

    settings = stack.settings()
    other = make_client(settings)
    now = datetime.now(UTC)
    jobs = {
        "old": api.submit([("a.jpg", noise_jpeg(1)), ("b.jpg", noise_jpeg(2))]).get_json()["id"],
        "older": api.submit([("c.jpg", noise_jpeg(3))]).get_json()["id"],
        "recent": api.submit([("d.jpg", noise_jpeg(4))]).get_json()["id"],
        "kept": other.submit([("e.jpg", noise_jpeg(5))]).get_json()["id"],
    }
    for name, age in (("old", 31), ("older", 40), ("recent", 29), ("kept", 400)):
        backdate(settings, jobs[name], now - timedelta(days=age))
    printed = set_retention(stack, monkeypatch, api.clinic_id, 30)
    assert "kept 30 days after upload" in printed
    before = bucket_keys(stack)
    owned = {name: {k for k in before if f"/{job_id}/" in k} for name, job_id in jobs.items()}
    assert all(owned.values()), owned

    stack.env["SKINSCAN_RETENTION_BATCH"] = "1"
    worker = stack.worker(queues="rescore")  # retention is routed to the low-priority queue
    celery_for(settings).send_task("worker.tasks.apply_retention")
    deadline = time.monotonic() + 180
    while True:
        results = re.findall(r"worker\.tasks\.apply_retention\[[^\]]+\] succeeded in [0-9.]+s: (\d+)", worker.log())
        if len(results) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert results == ["1", "1", "0"], worker.log()[-3000:]  # a job per task, then a task that finds none

    for name in ("old", "older"):
        assert job_counts(settings, jobs[name]) == {"jobs": 0, "images": 0, "predictions": 0, "metrics": 0}
    for name in ("recent", "kept"):
        assert job_counts(settings, jobs[name])["images"] == 1
    assert bucket_keys(stack) == before - owned["old"] - owned["older"]
    events = deletions(settings)
    assert set(events) == {jobs["old"], jobs["older"]}
    for name, images in (("old", 2), ("older", 1)):
        event = events[jobs[name]]
        assert (event.actor, event.clinic_id, event.target_type) == ("retention", api.clinic_id, "job")
        assert event.details["images"] == images
    assert events[jobs["older"]].id < events[jobs["old"]].id  # oldest first
    with session_scope(settings) as session:
        change = session.scalars(select(AuditEvent).where(AuditEvent.action == "clinic.retention")).one()
        assert change.details == {"from_days": None, "to_days": 30} and change.actor.startswith("cli")
    # Deleted by retention like by hand: the API says so, as after a manual DELETE.
    again = api.client.delete(f"/api/v1/jobs/{jobs['old']}", headers=api.headers()).get_json()
    assert again["already_deleted"] is True and again["complete"] is True


def test_beat_schedules_retention_nightly_on_the_low_priority_queue(stack: Any) -> None:
    """beat sends the retention task at SKINSCAN_RETENTION_HOUR:MINUTE UTC, routed behind clinic uploads."""
    from private_services import settings_with

    from skinscan.broker import RESCORE_QUEUE, create_celery

    app = create_celery(settings_with(stack, SKINSCAN_RETENTION_HOUR="4", SKINSCAN_RETENTION_MINUTE="15"))
    entry = app.conf.beat_schedule["nightly-retention"]
    assert entry["task"] == "worker.tasks.apply_retention"
    assert (entry["schedule"].hour, entry["schedule"].minute) == ({4}, {15})
    assert app.amqp.router.route({}, "worker.tasks.apply_retention")["queue"].name == RESCORE_QUEUE


def test_jobs_page_says_when_each_job_is_removed(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Jobs page gives each job's removal time (the first nightly run after upload + retention), and
    'kept' once the clinic keeps its jobs again."""
    from web import create_app

    settings = stack.settings()
    clinic_id, email = make_user(settings)
    staff = Staff(create_app(settings), email)
    client = make_client(settings)
    with session_scope(settings) as session:
        job = Job(clinic_id=clinic_id, name="retained batch", status="done")
        session.add(job)
        session.flush()
        job_id = job.id
        assert client.clinic_id != clinic_id
    backdate(settings, job_id, datetime(2026, 11, 20, 5, 0, tzinfo=UTC))
    page = staff.get("/jobs").text
    assert "kept until you delete them" in page and 'data-role="removal">kept<' in page

    set_retention(stack, monkeypatch, clinic_id, 10)
    page = staff.get("/jobs").text
    # Uploaded 2026-11-20 05:00, kept 10 days: due 2026-11-30 05:00, the first run after it 2026-12-01 03:30.
    assert "Your clinic keeps jobs 10 days" in page
    assert '<time datetime="2026-12-01T03:30:00+00:00">2026-12-01 03:30 UTC</time>' in page
    assert "Removed by your clinic's retention <time datetime=\"2026-12-01T03:30:00+00:00\">" in staff.get(
        f"/jobs/{job_id}").text

    set_retention(stack, monkeypatch, clinic_id, None)
    assert 'data-role="removal">kept<' in staff.get("/jobs").text
    assert "Removed by" not in staff.get(f"/jobs/{job_id}").text


def test_removal_time_is_the_first_nightly_run_after_the_retention_ends(stack: Any) -> None:
    """Due before the run's time of day: that day's run; due after it, or exactly at it: as the query cuts."""
    from skinscan.retention import check_days, removal_time

    settings = stack.settings()  # 03:30 UTC
    assert removal_time(datetime(2026, 1, 1, 1, 0, tzinfo=UTC), 30, settings) == datetime(2026, 1, 31, 3, 30,
                                                                                            tzinfo=UTC)
    assert removal_time(datetime(2026, 1, 1, 3, 30, tzinfo=UTC), 1, settings) == datetime(2026, 1, 2, 3, 30,
                                                                                           tzinfo=UTC)
    assert removal_time(datetime(2026, 1, 1, 3, 31), 1, settings) == datetime(2026, 1, 3, 3, 30, tzinfo=UTC)
    assert removal_time(datetime(2026, 1, 1, tzinfo=UTC), None, settings) is None
    for bad in (0, -5, 40_000):
        with pytest.raises(ValueError, match="between 1 and"):
            check_days(bad)


def _lock_waiters(settings: Any) -> int:
    """Sessions of the stack's database now waiting for a row lock."""
    with session_scope(settings) as session:
        name = session.scalar(text("SELECT current_database()"))
        return session.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
                                   "AND wait_event_type = 'Lock'"), {"db": name}) or 0


def test_job_under_review_at_the_cutoff(stack: Any, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two connections on PostgreSQL, interleaved step by step:
    1. a review being saved when the run reaches the job: the run skips the job (its row is share-locked by the
       review's insert) and deletes the others; the review commits; the next run deletes the job with it;
    2. a review of an image whose job the run deleted after the clinician opened it: refused, saying so
       (404 from the API), nothing written, never a 500."""
    from skinscan.retention import delete_expired
    from skinscan.reviews import ReviewedImageGone, record_review
    from skinscan.storage import get_storage

    settings = stack.settings()
    now = datetime.now(UTC)
    under_review = api.submit([("r.jpg", noise_jpeg(11))]).get_json()["id"]
    plain = api.submit([("p.jpg", noise_jpeg(12))]).get_json()["id"]
    another = api.submit([("o.jpg", noise_jpeg(13))]).get_json()["id"]
    for job_id in (under_review, plain, another):
        backdate(settings, job_id, now - timedelta(days=8))
    backdate(settings, plain, now - timedelta(days=9))
    set_retention(stack, monkeypatch, api.clinic_id, 7)
    storage = get_storage(settings)

    def image_of(session: Any, job_id: str) -> ImageRecord:
        return session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id)).one()

    # 1. The review's transaction has inserted its row, not yet committed, when the run reaches the job.
    with session_scope(settings) as reviewing:
        image = image_of(reviewing, under_review)
        record_review(reviewing, image, decision="reviewed", note="seen at the cut-off", reviewer="dr@example",
                      user_id=None, version=None)
        reviewing.flush()
        # The run goes while the review holds its locks: it must not wait for the review and must skip its job.
        done: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: done.update(run=delete_expired(
            settings, storage, now=now, limit=10)))
        runner.start()
        runner.join(60)
        assert not runner.is_alive(), f"the run waited for the review ({_lock_waiters(settings)} lock waiters)"
        first = done["run"]
        assert {d.job_id for d in first.deletions} == {plain, another} and first.more is False
    # The review committed after the run passed; the job and its review are still there.
    with session_scope(settings) as session:
        assert session.get(Job, under_review) is not None
        assert session.scalar(select(Review.note).where(Review.job_id == under_review)) == "seen at the cut-off"
    second = delete_expired(settings, storage, now=now, limit=10)
    assert [d.job_id for d in second.deletions] == [under_review] and second.deletions[0].complete
    with session_scope(settings) as session:
        assert session.scalar(select(Review.id).where(Review.job_id == under_review)) is None
        reviews_audited = list(session.scalars(select(AuditEvent.target_id)
                                               .where(AuditEvent.action == "image.review")))
    assert len(reviews_audited) == 1  # the audit trail keeps the review's event after the job is gone
    assert set(deletions(settings)) == {plain, another, under_review}

    # 2. A clinician's request read the image before the run deleted its job; the review comes after.
    again = api.submit([("o2.jpg", noise_jpeg(14))]).get_json()["id"]
    backdate(settings, again, now - timedelta(days=8))
    with session_scope(settings) as late:
        image = image_of(late, again)  # the page was loaded: the image row is in this session
        image_id = image.id
        assert delete_expired(settings, storage, now=now, limit=10).deleted == 1
        with pytest.raises(ReviewedImageGone, match="deleted with its job"):
            record_review(late, image, decision="reviewed", reviewer="dr@example", user_id=None, version=None)
        late.rollback()
    with session_scope(settings) as session:
        assert session.scalar(select(Review.id).where(Review.job_id == again)) is None
    answer = api.client.post(f"/api/v1/images/{image_id}/review", json={"decision": "reviewed"},
                             headers=api.headers())
    assert answer.status_code == 404


def test_review_form_sent_while_retention_deletes_the_job(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three connections on PostgreSQL, in a fixed order: a blocker share-locks the job's second image; the
    retention run deletes the first image (uncommitted) and waits on the second; a clinician's review form for
    the first image then waits on the run; the blocker lets go. The run deletes the job and the review is refused
    with a message on the Jobs page (a redirect, not a 500), writing nothing."""
    import psycopg
    from psycopg.errors import LockNotAvailable

    from skinscan.retention import delete_expired
    from web import create_app

    settings = stack.settings()
    clinic_id, email = make_user(settings)
    staff = Staff(create_app(settings), email)
    made = staff.upload([("a.jpg", noise_jpeg(21)), ("b.jpg", noise_jpeg(22))])
    job_id = made.get_json()["job_id"]
    now = datetime.now(UTC)
    backdate(settings, job_id, now - timedelta(days=8))
    set_retention(stack, monkeypatch, clinic_id, 7)
    with session_scope(settings) as session:
        first, second = session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
                                        .order_by(ImageRecord.position)).all()
    page = staff.get(f"/images/{first}").text  # the clinician opened the image before the cut-off
    assert 'name="decision"' in page
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def first_row_locked() -> bool:
        with psycopg.connect(url) as probe:
            try:
                probe.execute("SELECT 1 FROM images WHERE id = %s FOR KEY SHARE NOWAIT", (first,))
                return False
            except LockNotAvailable:
                return True

    def wait_until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    out: dict[str, Any] = {}
    with psycopg.connect(url) as blocker:
        blocker.execute("SELECT 1 FROM images WHERE id = %s FOR KEY SHARE", (second,))
        run = threading.Thread(target=lambda: out.update(run=delete_expired(settings, now=now)))
        run.start()
        wait_until(first_row_locked, "the run never deleted the first image")
        wait_until(lambda: _lock_waiters(settings) == 1, "the run is not waiting on the blocker")
        review = threading.Thread(target=lambda: out.update(answer=staff.client.post(
            f"/images/{first}/review", data={"csrf_token": staff.token, "decision": "reviewed", "note": "late"})))
        review.start()
        wait_until(lambda: _lock_waiters(settings) == 2, "the review is not waiting on the run")
        blocker.rollback()
    run.join(60)
    review.join(60)
    assert [d.job_id for d in out["run"].deletions] == [job_id]
    answer = out["answer"]
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/jobs"), answer.status_code
    jobs_page = staff.get("/jobs").text
    assert "The review was not saved: this image was deleted with its job" in jobs_page
    with session_scope(settings) as session:
        assert session.scalar(select(Review.id).where(Review.job_id == job_id)) is None
        assert session.scalar(select(AuditEvent.id).where(AuditEvent.action == "image.review")) is None
