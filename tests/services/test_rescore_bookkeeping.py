"""Re-score bookkeeping and the stalled-job sweeper on PostgreSQL, Redis and an S3 server: every step O(chunk).

A run is enqueued in keyset pages and counted per chunk, once, however often a chunk is delivered; the change report
is read a page at a time; failures keep a bounded sample and a count; the sweeper re-sends only the chunk that was
really lost (not one waiting in the queue or held by a worker).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import insert, select, update

from skinscan.db import session_scope
from skinscan.tables import (
    Clinic,
    ImageRecord,
    Job,
    JobChunk,
    Prediction,
    RescoreChange,
    RescoreChunk,
    RescoreRun,
    RescoreRunClinic,
    utcnow,
)

pytestmark = [pytest.mark.services]

OLD = "old-model"
LABELS = ["mel", "nv", "bcc"]


def production(settings: Any) -> str:
    """The production model's version (the stack's bundle, registered on first use)."""
    from skinscan.model.registry import ensure_production_model

    with session_scope(settings) as session:
        return ensure_production_model(session, settings).version


def clinic(settings: Any) -> str:
    """A new clinic's id."""
    with session_scope(settings) as session:
        row = Clinic(name=f"c-{uuid.uuid4().hex[:8]}")
        session.add(row)
        session.flush()
        return row.id


def seed(settings: Any, clinic_id: str, n: int, *, files: list[bytes] | None = None, same_time: int = 1,
         scored: str | None = OLD, hours_ago: float = 2.0) -> list[str]:
    """n scored images of one clinic (stored when files are given), each with a prediction of `scored` made
    hours_ago; `same_time` images share each upload time (ties broken by id). Returns their ids."""
    from skinscan.storage import get_storage

    storage = get_storage(settings) if files else None
    base = utcnow() - timedelta(hours=hours_ago + 1)
    with session_scope(settings) as session:
        job = Job(clinic_id=clinic_id, status="done", model_version=scored or OLD, total=n, scored=n)
        session.add(job)
        session.flush()
        images, preds = [], []
        for i in range(n):
            image_id = uuid.uuid4().hex
            key = None
            if storage is not None and files:
                key = f"test/{image_id}"
                storage.put(key, files[i % len(files)], "image/jpeg")
            images.append({"id": image_id, "job_id": job.id, "clinic_id": clinic_id, "position": i,
                           "filename": f"img{i}.jpg", "storage_key": key, "status": "scored",
                           "created_at": base + timedelta(seconds=i // same_time)})
            if scored is not None:
                flagged = i % 3 == 0
                preds.append({"image_id": image_id, "model_version": scored, "label": LABELS[i % 3],
                              "probabilities": {"mel": 0.5}, "confidence": 0.5, "malignancy": 0.5,
                              "flagged": flagged, "created_at": utcnow() - timedelta(hours=hours_ago)})
        session.execute(insert(ImageRecord), images)
        if preds:
            session.execute(insert(Prediction), preds)
        return [r["id"] for r in images]


def chunks_of(settings: Any, run_id: int) -> list[RescoreChunk]:
    """The run's chunk records, by first image id."""
    with session_scope(settings) as session:
        return list(session.scalars(select(RescoreChunk).where(RescoreChunk.run_id == run_id)
                                    .order_by(RescoreChunk.first_id)))


def get_run(settings: Any, run_id: int) -> RescoreRun:
    """A fresh read of a run."""
    with session_scope(settings) as session:
        run = session.get(RescoreRun, run_id)
        assert run is not None
        return run


def clinic_counts(settings: Any, run_id: int) -> dict[str, tuple[int, int, int, int, int]]:
    """{clinic id: (total, done, failed, changed, flagged)} of a run."""
    with session_scope(settings) as session:
        return {r.clinic_id: (r.total, r.done, r.failed, r.changed, r.flagged) for r in session.scalars(
            select(RescoreRunClinic).where(RescoreRunClinic.run_id == run_id))}


def expected_changes(settings: Any, ids: list[str], version: str) -> dict[str, tuple[int, float]]:
    """{image id: (rank, new malignancy)} of the images whose label or flag changed, from the predictions table."""
    with session_scope(settings) as session:
        preds = {(p.image_id, p.model_version): p for p in session.scalars(
            select(Prediction).where(Prediction.image_id.in_(ids)))}
    out = {}
    for i in ids:
        old, new = preds[(i, OLD)], preds.get((i, version))
        if new is not None and (old.label != new.label or old.flagged != new.flagged):
            out[i] = (0 if new.flagged and not old.flagged else 1, new.malignancy)
    return out


def queued(redis_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    """(task id, args) of every message waiting in a Redis queue, the next to be delivered first."""
    client = redis.Redis.from_url(redis_url)
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        out.append((message["headers"]["id"], json.loads(body)[0]))
    return out


@pytest.fixture()
def ham_bytes(ham_dir: Path) -> list[bytes]:
    """A few real HAM10000 images."""
    return [p.read_bytes() for p in sorted((ham_dir / "images").glob("ISIC_*.jpg"))[:6]]


def test_redelivered_chunk_counts_once(stack, ham_bytes) -> None:  # type: ignore[no-untyped-def]
    """Chunks scored with the real model through rescore_chunk, one of them delivered twice (and one after the run
    ended): the run and each clinic count every image exactly once, and the change report matches predictions."""
    from worker.rescore import rescore_chunk, start_rescore

    settings = stack.settings()
    version = production(settings)
    a, b = clinic(settings), clinic(settings)
    ids = seed(settings, a, 6, files=ham_bytes) + seed(settings, b, 4, files=ham_bytes)
    run = start_rescore(settings, actor="test", chunk_size=4)
    assert run is not None and run.total == 10 and run.enqueued_at is not None and run.status == "running"
    chunks = chunks_of(settings, run.id)
    assert sorted(c.size for c in chunks) == [2, 4, 4] and sorted(i for c in chunks for i in c.image_ids) == sorted(ids)
    assert {t for t, _ in queued(stack.redis_url, "rescore")} == {c.task_id for c in chunks}

    first = chunks[0].image_ids
    rescore_chunk(run.id, first, settings)
    with session_scope(settings) as session:
        assert len(session.scalars(select(Prediction.id).where(Prediction.model_version == version,
                                                               Prediction.image_id.in_(first))).all()) == len(first)
    assert rescore_chunk(run.id, list(reversed(first)), settings) == 0  # the redelivery writes and counts nothing
    mid = get_run(settings, run.id)
    assert (mid.status, mid.total, mid.done, mid.failed) == ("running", 10, len(first), 0)
    for chunk in chunks[1:]:
        rescore_chunk(run.id, chunk.image_ids, settings)
    assert rescore_chunk(run.id, chunks[1].image_ids, settings) == 0  # delivered again after the run finished

    final = get_run(settings, run.id)
    changes = expected_changes(settings, ids, version)
    newly = sum(1 for rank, _ in changes.values() if rank == 0)
    assert (final.status, final.total, final.done, final.failed) == ("done", 10, 10, 0)
    assert (final.changed, final.flagged) == (len(changes), newly) and final.duration_s is not None
    assert all(c.completed_at is not None for c in chunks_of(settings, run.id))
    per_clinic = clinic_counts(settings, run.id)
    assert (per_clinic[a][:3], per_clinic[b][:3]) == ((6, 6, 0), (4, 4, 0))
    assert per_clinic[a][3] + per_clinic[b][3] == len(changes)
    with session_scope(settings) as session:
        listed = set(session.scalars(select(RescoreChange.image_id).where(RescoreChange.run_id == run.id)))
        per_image = session.execute(select(Prediction.image_id).where(Prediction.model_version == version,
                                                                      Prediction.image_id.in_(ids))).all()
    assert listed == set(changes) and sorted(i for i, in per_image) == sorted(ids)


def test_keyset_enqueue_covers_every_image_exactly_once(stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Small keyset pages over images that share upload times, with out-of-scope images mixed in and the broker
    failing mid-enqueue: after the resume, every image in scope is in exactly one chunk and counted once."""
    import worker.rescore as rescore

    settings = stack.settings()
    version = production(settings)
    a, b = clinic(settings), clinic(settings)
    in_scope = seed(settings, a, 230, same_time=7) + seed(settings, b, 170, same_time=50)
    seed(settings, a, 40, scored=None)  # never scored: not in a re-score's scope
    seed(settings, b, 30, scored=version)  # scored by the production model already
    monkeypatch.setattr(rescore, "ENQUEUE_PAGE", 48)
    real = rescore._dispatch
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("broker down")
        real(*args, **kwargs)

    monkeypatch.setattr(rescore, "_dispatch", flaky)
    with pytest.raises(ConnectionError):
        rescore.start_rescore(settings, actor="test", chunk_size=10)
    with session_scope(settings) as session:
        run_id = session.scalar(select(RescoreRun.id))
    assert get_run(settings, run_id).enqueued_at is None  # stopped mid-way
    monkeypatch.setattr(rescore, "_dispatch", real)
    resumed = rescore.start_rescore(settings, actor="test", chunk_size=10)  # resumes; resends unfinished chunks
    assert resumed is not None and resumed.id == run_id and resumed.enqueued_at is not None

    chunks = chunks_of(settings, run_id)
    listed = [i for c in chunks for i in c.image_ids]
    assert sorted(listed) == sorted(in_scope)  # every image in scope once, nothing else
    assert all(c.first_id == min(c.image_ids) and c.size == len(c.image_ids) <= 10 for c in chunks)
    assert resumed.total == len(in_scope)
    assert {k: v[0] for k, v in clinic_counts(settings, run_id).items()} == {a: 230, b: 170}
    waiting = queued(stack.redis_url, "rescore")
    assert {c.task_id for c in chunks} <= {t for t, _ in waiting}  # each chunk's current task is queued
    assert all(args[0] == run_id for _, args in waiting)


def test_change_report_pages_return_every_change_once(stack, api) -> None:  # type: ignore[no-untyped-def]
    """The change report read with ?limit=7 and each page's next_cursor lists every change of the clinic once, in
    report order (newly flagged first, then by new malignancy, ties by image id), the same as the CSV."""
    from worker.rescore import complete_chunk, start_rescore

    settings = stack.settings()
    version = production(settings)
    other = clinic(settings)
    mine = seed(settings, api.clinic_id, 45)
    theirs = seed(settings, other, 9)
    run = start_rescore(settings, actor="test", chunk_size=8)
    assert run is not None
    with session_scope(settings) as session:  # the new model's predictions, as its scorer would write them
        session.execute(insert(Prediction), [
            {"image_id": i, "model_version": version, "label": LABELS[(n * 2) % 3], "probabilities": {"mel": 0.5},
             "confidence": 0.5, "malignancy": [0.2, 0.6, 0.9][n % 3], "flagged": n % 4 == 0, "created_at": utcnow()}
            for n, i in enumerate(mine + theirs)])
    for chunk in chunks_of(settings, run.id):
        with session_scope(settings) as session:
            assert complete_chunk(session, run.id, chunk.image_ids, {})
    assert get_run(settings, run.id).status == "done"

    expected = expected_changes(settings, mine, version)
    order = sorted(expected, key=lambda i: (expected[i][0], -expected[i][1], i))
    assert 7 < len(order) < len(mine)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        resp = api.get(f"/api/v1/changes?run={run.id}&limit=7" + (f"&cursor={cursor}" if cursor else ""))
        assert resp.status_code == 200, resp.get_json()
        body = resp.get_json()
        assert len(body["changes"]) <= 7 and body["run"]["changed"] == len(expected)
        seen += [r["image_id"] for r in body["changes"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == order and pages == (len(order) + 6) // 7
    csv_rows = list(csv.DictReader(io.StringIO(api.get(f"/api/v1/changes?run={run.id}&format=csv")
                                              .get_data(as_text=True))))
    assert [r["image_id"] for r in csv_rows] == order
    assert api.get(f"/api/v1/changes?run={run.id}&cursor=bm90LWEtY3Vyc29y").status_code == 400
    assert api.get(f"/api/v1/changes?run={run.id}&limit=0").status_code == 400
    summary = api.get(f"/api/v1/rescore-runs/{run.id}").get_json()
    assert (summary["images"], summary["done"], summary["changed"]) == (45, 45, len(expected))


def test_error_samples_are_bounded_with_a_count(stack) -> None:  # type: ignore[no-untyped-def]
    """Two chunks of 15 images that all fail: the run counts 30 failures and keeps the first 20 reasons."""
    from skinscan.rescore_runs import ERROR_SAMPLES
    from worker.rescore import complete_chunk, start_rescore

    settings = stack.settings()
    production(settings)
    a = clinic(settings)
    seed(settings, a, 30)
    run = start_rescore(settings, actor="test", chunk_size=15)
    assert run is not None
    for chunk in chunks_of(settings, run.id):
        for _ in range(2):  # each delivered twice
            with session_scope(settings) as session:
                complete_chunk(session, run.id, chunk.image_ids, {i: f"broken {i}" for i in chunk.image_ids})
    final = get_run(settings, run.id)
    assert (final.status, final.total, final.done, final.failed) == ("done", 30, 0, 30)
    assert len(final.errors) == ERROR_SAMPLES == 20
    assert all(reason == f"broken {i}" for i, reason in final.errors.items())
    assert clinic_counts(settings, run.id)[a][:3] == (30, 0, 30)


def _move_to_unacked(client: redis.Redis, queue: str, task_id: str) -> None:
    """Take a message off the queue into the `unacked` hash, as kombu does when it delivers it to a worker."""
    for raw in client.lrange(queue, 0, -1):
        if json.loads(raw)["headers"]["id"] == task_id:
            client.lrem(queue, 1, raw)
            client.hset("unacked", uuid.uuid4().hex, json.dumps([json.loads(raw), "", queue]))
            return
    raise AssertionError(f"task {task_id} is not in {queue}")


def _drop(client: redis.Redis, queue: str, task_id: str) -> None:
    """Remove a message from the queue (a message lost with the broker)."""
    for raw in client.lrange(queue, 0, -1):
        if json.loads(raw)["headers"]["id"] == task_id:
            client.lrem(queue, 1, raw)
            return
    raise AssertionError(f"task {task_id} is not in {queue}")


def test_sweeper_resends_only_the_lost_chunk(stack) -> None:  # type: ignore[no-untyped-def]
    """A stalled job of four chunks: one held by a worker, one lost, one waiting at the head of the queue (all three
    dispatched long ago) and one sent just now. The sweeper sends the lost one again, and nothing else."""
    from skinscan.jobs.dispatch import enqueue_job
    from worker.dispatch import requeue_lost

    settings = stack.settings()
    production(settings)
    a = clinic(settings)
    ids = seed(settings, a, 4 * settings.chunk_size, scored=None)
    with session_scope(settings) as session:
        job_id = session.scalar(select(ImageRecord.job_id).where(ImageRecord.id == ids[0]))
        session.execute(update(Job).where(Job.id == job_id).values(status="queued", scored=0))
        session.execute(update(ImageRecord).where(ImageRecord.job_id == job_id).values(status="pending"))
    with session_scope(settings) as session:
        assert enqueue_job(session, job_id, settings) == 4
    with session_scope(settings) as session:
        chunks = list(session.scalars(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.seq)))
    client = redis.Redis.from_url(stack.redis_url)
    assert [t for t, _ in queued(stack.redis_url, "skinscan")] == [c.task_id for c in chunks]
    held, lost, waiting, fresh = chunks
    _move_to_unacked(client, "skinscan", held.task_id)
    _drop(client, "skinscan", lost.task_id)
    now = utcnow()
    with session_scope(settings) as session:
        for chunk, hours in ((held, 3), (lost, 2), (waiting, 1)):
            session.execute(update(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq == chunk.seq)
                            .values(dispatched_at=now - timedelta(hours=hours)))
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=now - timedelta(hours=1)))

    assert requeue_lost(settings) == 1
    with session_scope(settings) as session:
        after = {c.seq: c for c in session.scalars(select(JobChunk).where(JobChunk.job_id == job_id))}
    assert after[lost.seq].task_id != lost.task_id and after[lost.seq].sends == 2
    assert [(after[c.seq].task_id, after[c.seq].sends) for c in (held, waiting, fresh)] == [
        (c.task_id, 1) for c in (held, waiting, fresh)]
    assert queued(stack.redis_url, "skinscan") == [(waiting.task_id, [job_id, waiting.image_ids]),
                                                   (fresh.task_id, [job_id, fresh.image_ids]),
                                                   (after[lost.seq].task_id, [job_id, lost.image_ids])]
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=now - timedelta(hours=1)))
    assert requeue_lost(settings) == 0  # swept again at once: the resent chunk waits in the queue now


def test_sweeper_resends_a_lost_rescore_chunk_only(stack) -> None:  # type: ignore[no-untyped-def]
    """A re-score run's chunk whose message was lost long ago is sent again; the ones waiting are left alone."""
    from worker.dispatch import requeue_lost
    from worker.rescore import start_rescore

    settings = stack.settings()
    production(settings)
    seed(settings, clinic(settings), 12)
    run = start_rescore(settings, actor="test", chunk_size=4)
    assert run is not None
    first, second, third = chunks_of(settings, run.id)
    client = redis.Redis.from_url(stack.redis_url)
    _drop(client, "rescore", second.task_id)
    with session_scope(settings) as session:
        session.execute(update(RescoreChunk).where(RescoreChunk.run_id == run.id, RescoreChunk.first_id ==
                                                   second.first_id).values(dispatched_at=utcnow() - timedelta(hours=1)))
    assert requeue_lost(settings) == 1
    again = {c.first_id: c for c in chunks_of(settings, run.id)}
    assert again[second.first_id].task_id != second.task_id and again[second.first_id].sends == 2
    assert {c.first_id: c.task_id for c in (first, third)} == {c: again[c].task_id for c in (first.first_id,
                                                                                            third.first_id)}
    assert requeue_lost(settings) == 0


def test_migration_0007_backfills_finished_runs_and_downgrades(stack, api) -> None:  # type: ignore[no-untyped-def]
    """A run finished before 0007 keeps its change report and per-clinic counts after the upgrade; downgrading to
    0006 and upgrading again works."""
    from sqlalchemy import inspect, text

    from skinscan.db import dispose_engines, get_engine
    from skinscan.migrate import downgrade, upgrade

    settings = stack.settings()
    ids = seed(settings, api.clinic_id, 12)
    downgrade(settings, "0006")
    dispose_engines()
    assert "rescore_changes" not in inspect(get_engine(settings)).get_table_names()
    started = utcnow() - timedelta(minutes=30)
    with get_engine(settings).begin() as conn:
        conn.execute(text(
            "INSERT INTO rescore_runs (model_from, model_to, clinic_id, since, status, actor, total, done, failed, "
            "changed, flagged, started_at, updated_at, finished_at) VALUES ('old-model', 'new-model', NULL, NULL, "
            "'done', 'schedule', 12, 12, 0, 0, 0, :s, :s, :s)"), {"s": started})
        for n, image_id in enumerate(ids):  # the new model flags every fourth image; old flags every third
            conn.execute(text(
                "INSERT INTO predictions (image_id, model_version, probabilities, label, confidence, malignancy, "
                "flagged, created_at) VALUES (:i, 'new-model', '{}', :label, 0.5, :m, :f, :at)"),
                {"i": image_id, "label": LABELS[n % 3], "m": n / 100, "f": n % 4 == 0, "at": utcnow()})
    upgrade(settings)
    dispose_engines()
    flips = [i for n, i in enumerate(ids) if (n % 4 == 0) != (n % 3 == 0)]
    page = api.get("/api/v1/changes").get_json()
    assert sorted(r["image_id"] for r in page["changes"]) == sorted(flips) and page["next_cursor"] is None
    assert (page["run"]["images"], page["run"]["done"], page["run"]["changed"]) == (12, 12, len(flips))
    with session_scope(settings) as session:
        run = session.scalars(select(RescoreRun)).one()
        assert run.enqueued_at is not None and run.status == "done"
