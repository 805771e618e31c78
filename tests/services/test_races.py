"""Races between requests and workers on real PostgreSQL, Redis and S3, each interleaved deterministically: the
second connection runs right after a chosen statement of the first, which goes on only once the second has
committed or waits on a lock the first holds."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from interleave import after_statement
from realservices import Api
from sqlalchemy import select, update
from test_job_management import noise_jpeg
from test_prediction_writes import _Rules

from skinscan.db import get_engine, session_scope
from skinscan.jobs.dispatch import pending_image_ids
from skinscan.model.scorer import Scored
from skinscan.tables import ImageRecord, Job, JobChunk


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
    from skinscan.jobs.cancellation import cancel_job
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


def post_part(client: Any, api: Api, job_id: str, seeds: range) -> Any:
    """POST a part of images to an uploading job."""
    import io

    data = {"files": [(io.BytesIO(noise_jpeg(s)), f"part-{s}.jpg") for s in seeds]}
    return client.post(f"/api/v1/jobs/{job_id}/images", data=data, headers=api.headers(),
                       content_type="multipart/form-data")


def claimed_and_stored(stack: Any, job_id: str) -> tuple[set[str], set[str]]:
    """(storage keys the job's image rows claim, keys under the job's prefix in the bucket)."""
    from test_job_management import bucket_keys

    settings = stack.settings()
    with session_scope(settings) as session:
        claimed = set(session.scalars(select(ImageRecord.storage_key).where(ImageRecord.job_id == job_id,
                                                                            ImageRecord.storage_key.is_not(None))))
    return claimed, {k for k in bucket_keys(stack) if f"/{job_id}/" in k}


@pytest.mark.services
@pytest.mark.parametrize("closer", ["cancel", "start"])
@pytest.mark.parametrize("first", ["closer", "part"])
def test_a_part_never_lands_in_a_closed_job(stack: Any, api: Api, closer: str, first: str) -> None:
    """A part racing a cancel or start either commits before it (and is cancelled or queued with the rest) or is
    refused with 409 and keeps nothing, its stored objects removed; no image is left pending in a closed job."""
    settings = stack.settings()
    job_id = submit(api, 2, finalize="false")

    def close() -> Any:
        client = api.client.application.test_client()
        return client.post(f"/api/v1/jobs/{job_id}/{closer}", headers=api.headers())

    # closer first: it runs once the part's upload intent is committed (its images are being stored);
    # part first: it runs once the part holds the job's row lock, just before the part's rows commit.
    if first == "closer":
        def match(s: str) -> bool:
            return s.startswith("INSERT INTO uploads")
    else:
        def match(s: str) -> bool:
            return "FROM jobs" in s and "FOR UPDATE" in s
    with after_statement(get_engine(settings), stack.db.url, match, close) as other:
        response = post_part(api.client, api, job_id, range(10, 13))
    closed = other.results[0]
    assert closed.status_code == 200 if closer == "cancel" else 202, closed.get_json()
    job = job_row(settings, job_id)
    images = statuses(settings, job_id)
    if first == "closer":
        assert response.status_code == 409, response.get_json()
        assert f"job is {job.status}" in response.get_json()["error"]
        assert len(images) == 2
    else:
        assert response.status_code == 202, response.get_json()
        assert len(images) == 5 and job.total == 5
    if closer == "cancel":
        assert job.status == "cancelled" and "pending" not in images.values()
    else:
        assert job.status == "queued"
        with session_scope(settings) as session:
            covered = {i for ids in session.scalars(select(JobChunk.image_ids).where(JobChunk.job_id == job_id))
                       for i in ids}
            assert set(pending_image_ids(session, job_id)) <= covered  # every pending image is sent to a worker
    claimed, stored = claimed_and_stored(stack, job_id)
    assert stored == claimed, "objects of a refused part were left in the bucket"


@pytest.mark.services
def test_cancel_while_scoring_leaves_no_prediction_on_a_cancelled_image(stack: Any, api: Api) -> None:
    """Two chunks in flight: a cancel comes while the first writes its results (it waits for them, or they find
    the images cancelled) and the second finishes after the cancel; only images that end `scored` have a
    prediction, and the job's counters match its rows."""
    from skinscan.jobs.cancellation import cancel_job
    from skinscan.labels import CLASSES
    from skinscan.tables import Prediction
    from worker.pipeline import claim_chunk, record_results

    settings = stack.settings()
    job_id = submit(api, 4)
    a, b, c, d = image_ids(settings, job_id)
    version = job_row(settings, job_id).model_version
    claim_chunk(job_id, [a, b], settings)
    claim_chunk(job_id, [c, d], settings)
    probs = dict.fromkeys(CLASSES, 0.0) | {"nv": 1.0}

    def cancel() -> int:
        with session_scope(settings) as session:
            return cancel_job(session, job_id, "nurse@test")[1]

    first_write = ("UPDATE jobs", "INSERT INTO predictions", "UPDATE images")  # whichever comes first
    with after_statement(get_engine(settings), stack.db.url, lambda s: s.startswith(first_write), cancel) as other:
        record_results(job_id, _Rules(version), [Scored(a, probs), Scored(b, probs)], settings)
    record_results(job_id, _Rules(version), [Scored(c, probs), Scored(d, probs)], settings)  # in flight meanwhile

    with session_scope(settings) as session:
        predicted = set(session.scalars(select(Prediction.image_id).where(Prediction.image_id.in_([a, b, c, d]))))
    images = statuses(settings, job_id)
    assert {i for i, s in images.items() if s == "cancelled"}.isdisjoint(predicted), \
        f"cancelled images have predictions: {images}, predicted {len(predicted)}"
    assert predicted == {i for i, s in images.items() if s == "scored"}
    job = job_row(settings, job_id)
    assert job.status == "cancelled" and other.results == [4 - job.scored] and job.scored == len(predicted)


@pytest.mark.services
def test_four_simultaneous_deletes_delete_once(stack: Any, api: Api) -> None:
    """Four DELETEs of one job, three of them sent while the first has read the job: exactly one answers
    already_deleted false and writes the `job.delete` audit event; every answer says nothing is left stored."""
    from skinscan.tables import AuditEvent

    settings = stack.settings()
    job_id = submit(api, 3)

    def delete() -> Any:
        return api.client.application.test_client().delete(f"/api/v1/jobs/{job_id}", headers=api.headers())

    with after_statement(get_engine(settings), stack.db.url, lambda s: "FROM jobs" in s, delete, delete,
                         delete) as others:
        first = delete()
    answers = [r.get_json() for r in [first, *others.results]]
    assert all(r.status_code == 200 for r in [first, *others.results]), answers
    assert sorted(a["already_deleted"] for a in answers) == [False, True, True, True], answers
    assert all(a["complete"] for a in answers), answers
    with session_scope(settings) as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.delete",
                                                          AuditEvent.target_id == job_id)).all()
    assert len(events) == 1, f"{len(events)} job.delete audit events"
    assert claimed_and_stored(stack, job_id) == (set(), set())


def _deliver_half(r: Any, queue: str = "skinscan") -> tuple[str, bytes]:
    """What a worker's BRPOP does: take the oldest message off the queue (kombu records it unacked next)."""
    raw = r.rpop(queue)
    assert raw is not None, "no message waiting"
    return uuid.uuid4().hex, raw


def _record_unacked(r: Any, tag: str, raw: bytes, queue: str = "skinscan") -> None:
    """What kombu does next (QoS.append): record the delivered message in the `unacked` hash and its index."""
    r.hset("unacked", tag, json.dumps([json.loads(raw), "", queue]))
    r.zadd("unacked_index", {tag: time.time()})


@pytest.mark.services
@pytest.mark.parametrize("moment", ["delivered", "mid-delivery"])
def test_sweeper_never_judges_a_delivery_in_progress_lost(stack: Any, api: Api, monkeypatch: Any,
                                                          moment: str) -> None:
    """A stalled job's chunk is delivered to a worker right after the sweeper's first read of Redis (or was half
    delivered: taken off the queue, not yet recorded unacked); the sweeper sends nothing. A chunk really lost
    (in neither) is sent again."""
    import redis

    from skinscan.tables import utcnow
    from worker.dispatch import requeue_lost

    settings = stack.settings()
    job_id = submit(api, 3)
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=long_ago))
        session.execute(update(JobChunk).where(JobChunk.job_id == job_id).values(dispatched_at=long_ago))
    r = redis.Redis.from_url(stack.redis_url)
    assert r.llen("skinscan") == 1
    half = _deliver_half(r) if moment == "mid-delivery" else None
    fired: list[str] = []
    execute = redis.Redis.execute_command

    def delivery_after_first_read(self: Any, *args: Any, **options: Any) -> Any:
        result = execute(self, *args, **options)
        name = str(args[0]).upper() if args else ""
        if not fired and name in ("HSCAN", "HVALS", "HGETALL", "LLEN", "LRANGE", "EVAL", "EVALSHA"):
            fired.append(name)
            _record_unacked(r, *(half or _deliver_half(r)))
        return result

    monkeypatch.setattr(redis.Redis, "execute_command", delivery_after_first_read)
    sent = requeue_lost(settings)
    monkeypatch.undo()
    assert fired, "the sweeper read nothing from Redis"
    assert sent == 0, f"a chunk being delivered was judged lost and sent again (first read: {fired[0]})"
    assert r.hlen("unacked") == 1 and r.llen("skinscan") == 0

    r.delete("unacked", "unacked_index")  # its worker died and the lease record went with it: really lost
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=long_ago))
    assert requeue_lost(settings) == 1 and r.llen("skinscan") == 1


@pytest.mark.services
def test_csv_export_while_scoring_lists_every_row_once(stack: Any, api: Api) -> None:
    """Every image ties on upload position and the scored ones on malignancy; an image is scored to the top of the
    risk order between two pages of the export. Each image is listed exactly once, ranked 1..n, ties by image id,
    as the job stood when the export began."""
    import csv

    from skinscan.labels import CLASSES
    from web.results import iter_csv
    from worker.pipeline import claim_chunk, record_results

    settings = stack.settings()
    job_id = submit(api, 7)
    ids = image_ids(settings, job_id)
    version = job_row(settings, job_id).model_version
    with session_scope(settings) as session:  # parts added at once used to share positions: all tie here
        session.execute(update(ImageRecord).where(ImageRecord.job_id == job_id).values(position=0))
    claim_chunk(job_id, ids, settings)
    same = dict.fromkeys(CLASSES, 0.0) | {"mel": 0.3, "nv": 0.7}
    record_results(job_id, _Rules(version), [Scored(i, same) for i in ids[:3]], settings)  # three tie on score

    with session_scope(settings) as session:
        export = iter_csv(session, session.get(Job, job_id), page=2)
        first = next(export)  # the header and the first page
        top = dict.fromkeys(CLASSES, 0.0) | {"mel": 0.95, "nv": 0.05}
        record_results(job_id, _Rules(version), [Scored(ids[-1], top)], settings)  # another connection
        text = first + "".join(export)
    rows = list(csv.DictReader(text.splitlines()))
    listed = [r["image_id"] for r in rows]
    assert sorted(listed) == sorted(ids), f"rows repeated or vanished: {len(listed)} rows, {len(set(listed))} ids"
    assert [int(r["risk_rank"]) for r in rows] == list(range(1, 8))
    assert listed[:3] == sorted(ids[:3]) and listed[3:] == sorted(ids[3:])  # ties: image id order
    assert [r["status"] for r in rows] == ["scored"] * 3 + ["pending"] * 4  # as the job stood at the start
