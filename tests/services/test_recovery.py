"""Recovery on real services within bounds: a killed worker's tasks come back within a minute of its restart (no
task delivered twice while its worker lives), and images a killed web process stored are swept from the bucket.

Each test runs real `skinscan worker` / `skinscan web` / `skinscan beat` processes on PostgreSQL, Redis and an S3
server, with the production defaults for the visibility timeout and the stalled-job sweeper unless it says so.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import requests
from private_services import ServiceProcess, make_client
from realservices import ROOT, free_port, wait_port
from sqlalchemy import func, select
from test_faults import assert_exactly_once, in_flight, scored, submit, wait_for

from skinscan.db import session_scope
from skinscan.tables import ImageRecord, Job

pytestmark = [pytest.mark.services, pytest.mark.slow]
log = logging.getLogger(__name__)

# The production defaults of these two (not the stack's quick test values) are what the recovery bound is about.
PRODUCTION_DEFAULTS = ("SKINSCAN_VISIBILITY_TIMEOUT", "SKINSCAN_REQUEUE_AFTER_SECONDS")


@pytest.fixture()
def ham_files(ham_dir) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    """120 real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[2000:2120]
    return [(p.name, p.read_bytes()) for p in paths]


def attempts(settings: Any, job_id: str) -> dict[str, int]:
    """Tries counted on each of a job's images."""
    with session_scope(settings) as session:
        return dict(session.execute(select(ImageRecord.id, ImageRecord.attempts)
            .where(ImageRecord.job_id == job_id)).all())


def test_killed_worker_recovered_within_a_minute_of_restart(stack, ham_files) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the worker's main process while it holds a chunk and start another worker at once: with the
    default settings the job is done within 60 s of the restart, each image has exactly one prediction, and only
    the killed chunk ran twice."""
    for name in PRODUCTION_DEFAULTS:
        stack.env.pop(name, None)
    # Chunks of 32 scored one image at a time on one thread, so a chunk is in flight for a few hundred ms (the
    # shipped network scores an image in a few ms): long enough to kill the worker while it holds one.
    stack.env.update({"SKINSCAN_CHUNK_SIZE": "32", "SKINSCAN_BATCH_SIZE": "1", "SKINSCAN_DECODE_WORKERS": "1",
                      "SKINSCAN_THREADS": "1"})
    settings = stack.settings()
    assert settings.requeue_after_seconds >= 600  # the stalled-job sweeper is not what brings the chunk back
    beat = ServiceProcess(stack.env, stack.tmp / "beat.log", "beat").start()
    worker = stack.worker()
    try:
        n = len(ham_files)
        client, job_id = submit(stack, ham_files)
        wait_for(lambda: scored(settings, job_id) >= 16 and in_flight(settings, job_id), 600,
                 "a chunk in flight mid-job", 0.05)
        os.kill(worker.proc.pid, signal.SIGKILL)  # the main process only (its pool children die with it)
        worker.proc.wait(10)
        # What the dead worker held is read after its death: an image seen in flight just before the kill may
        # have been written in between, and then it is never redelivered.
        time.sleep(0.5)
        held = in_flight(settings, job_id)
        assert held and scored(settings, job_id) < n
        restarted = time.monotonic()
        stack.worker()
        job = client.wait(job_id, timeout=180)
        took = time.monotonic() - restarted
    finally:
        beat.stop()
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)  # anything of the killed worker's group still there
        except ProcessLookupError:
            pass
    assert job["status"] == "done", job
    log.info("the job was done %.1f s after the worker restarted", took)
    assert took < 60, f"the job took {took:.0f}s after the worker restarted"
    assert_exactly_once(settings, job_id, n)
    tries = attempts(settings, job_id)
    assert all(tries[i] >= 2 for i in held)  # the killed chunk was delivered again
    assert sum(1 for t in tries.values() if t > 1) <= 32  # ... and nothing else was


def test_long_task_is_not_delivered_twice(stack, ham_dir) -> None:  # type: ignore[no-untyped-def]
    """One chunk that runs a few times longer than a 2-second visibility timeout, with a second worker idle on
    the queue: its lease is renewed while it runs, so it is delivered once and every image is tried once."""
    # 2,000 images one at a time on one thread: several seconds even with the shipped network's few ms an image.
    files = [(p.name, p.read_bytes()) for p in sorted((ham_dir / "images").glob("ISIC_*.jpg"))[3000:5000]]
    stack.env.update({"SKINSCAN_VISIBILITY_TIMEOUT": "2", "SKINSCAN_CHUNK_SIZE": str(len(files)),
                      "SKINSCAN_BATCH_SIZE": "1", "SKINSCAN_DECODE_WORKERS": "1", "SKINSCAN_THREADS": "1"})
    settings = stack.settings()
    stack.worker()
    stack.worker()
    client, job_id = submit(stack, files)
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done", job
    assert_exactly_once(settings, job_id, len(files))
    with session_scope(settings) as session:
        row = session.get(Job, job_id)
        ran = (row.finished_at - row.started_at).total_seconds()
    assert ran > 2 * settings.visibility_timeout, f"the chunk ran only {ran:.1f}s: the test proves nothing"
    assert set(attempts(settings, job_id).values()) == {1}
    logs = "".join(w.log() for w in stack.workers)
    assert len(re.findall(r"Task worker\.tasks\.score_chunk\[[^]]+\] received", logs)) == 1, logs[-3000:]


def bucket_keys(stack: Any) -> set[str]:
    """Every image key in the stack's bucket, listed with boto3 (not with the code under test); the model bundle
    the registry stores under models/ is left out."""
    import boto3

    from skinscan.model.store import MODELS_PREFIX

    s3 = boto3.client("s3", endpoint_url=stack.env["S3_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.env["S3_BUCKET"])
    return {o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].startswith(MODELS_PREFIX)}


def register_model(settings: Any) -> None:
    """Store and promote the configured bundle now, as a first start does, before a test breaks storage."""
    from skinscan.model.registry import ensure_production_model

    with session_scope(settings) as session:
        ensure_production_model(session, settings)


def claimed_keys(settings: Any) -> set[str]:
    """Storage keys of committed image rows."""
    with session_scope(settings) as session:
        return set(session.scalars(select(ImageRecord.storage_key).where(ImageRecord.storage_key.is_not(None))))


def intents(settings: Any) -> int:
    """Upload intents not yet ended (uploads refused or interrupted, and not yet swept)."""
    from skinscan.tables import Upload

    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(Upload)) or 0


def sweep_cli(stack: Any, *args: str, **env: str) -> int:
    """Run `skinscan sweep-orphans` as its own process; return how many objects it says it removed."""
    done = subprocess.run([sys.executable, "-m", "skinscan.cli", "sweep-orphans", *args], env={**stack.env, **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_web_killed_mid_upload_leaves_no_orphan_after_sweep(stack, ham_files) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the web server while it stores an upload's images: the images it stored have no row; a sweep
    within the grace period keeps them (the upload could still be running), and one after it leaves the bucket
    holding exactly the committed images."""
    settings = stack.settings()
    client = make_client(settings)
    port = free_port()
    web = ServiceProcess(stack.env, stack.tmp / "web.log", "web", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--threads", "2").start()
    auth = {"Authorization": f"Bearer {client.key}"}
    url = f"http://127.0.0.1:{port}/api/v1/jobs"
    try:
        wait_port("127.0.0.1", port, 600)
        kept = requests.post(url, headers=auth, timeout=300,
                             files=[("files", (n, b, "image/jpeg")) for n, b in ham_files[:10]])
        assert kept.status_code == 202, kept.text

        def upload() -> None:
            try:
                requests.post(url, headers=auth, timeout=300,
                              files=[("files", (n, b, "image/jpeg")) for n, b in ham_files])
            except requests.RequestException:
                pass  # the server dies under it

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        wait_for(lambda: len(bucket_keys(stack)) >= 10 + 20, 300, "the second upload's images being stored", 0.05)
        os.killpg(web.proc.pid, signal.SIGKILL)
        web.proc.wait(10)
        sender.join(60)
    finally:
        web.stop()
    with session_scope(settings) as session:
        jobs = list(session.scalars(select(Job.id).where(Job.clinic_id == client.clinic_id)))
    assert jobs == [kept.json()["id"]]  # the killed upload made no job
    stored, claimed = bucket_keys(stack), claimed_keys(settings)
    assert len(claimed) == 10 and claimed <= stored
    orphans = stored - claimed
    assert 20 <= len(orphans) < len(ham_files), len(orphans)  # stored with no row: patient images nobody sees
    assert intents(settings) == 1

    assert sweep_cli(stack) == 0  # within the grace period (default one hour): the upload might still be running
    assert bucket_keys(stack) == stored
    time.sleep(1.5)
    assert sweep_cli(stack, SKINSCAN_ORPHAN_GRACE_SECONDS="1") == len(orphans)
    assert bucket_keys(stack) == claimed  # the bucket holds exactly the committed images
    assert intents(settings) == 0
    assert sweep_cli(stack, SKINSCAN_ORPHAN_GRACE_SECONDS="0") == 0  # idempotent


@pytest.mark.parametrize(("route", "outage"), [("api", False), ("api", True), ("pages", False)])
def test_storage_error_mid_upload_keeps_nothing(stack, ham_files, monkeypatch, fresh_settings,  # type: ignore[no-untyped-def]
                                                route: str, outage: bool) -> None:
    """A put whose answer is lost (the object was stored, the client saw an error) answers 503 "nothing was
    kept", from the API and from the new-job page. If storage works again at once, every object of the upload is
    deleted before the answer; if it stays down, the beat sweep deletes them once it is back."""
    from skinscan.broker import create_celery
    from skinscan.storage import S3Storage, StorageError

    settings = stack.settings()
    client = make_client(settings)
    state = {"puts": 0, "down": False}
    register_model(settings)
    real = {name: getattr(S3Storage, name, None) for name in ("put", "delete", "list_keys")}

    def put(self: S3Storage, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if state["down"]:
            raise StorageError(f"cannot store object {key}: connection refused")
        real["put"](self, key, data, content_type)
        state["puts"] += 1
        if state["puts"] == 30:
            state["down"] = outage
            raise StorageError(f"cannot store object {key}: connection reset by peer")

    def failing(name: str) -> Any:
        def call(self: S3Storage, *args: Any) -> Any:
            if state["down"]:
                raise StorageError(f"cannot {name}: connection refused")
            return real[name](self, *args)
        return call

    monkeypatch.setattr(S3Storage, "put", put)
    monkeypatch.setattr(S3Storage, "delete", failing("delete"))
    monkeypatch.setattr(S3Storage, "list_keys", failing("list_keys"), raising=False)
    if route == "api":
        resp = client.submit(ham_files[:60])
    else:
        from test_web_pages import Staff, make_user

        from web import create_app

        _clinic, email = make_user(settings)
        resp = Staff(create_app(settings), email).upload(ham_files[:60])
    assert resp.status_code == 503 and "nothing was kept" in resp.get_json()["error"], resp.get_data()[:2000]
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    if not outage:
        assert bucket_keys(stack) == set()  # deleted right away, the object whose put seemed to fail too
        assert intents(settings) == 0
        return
    assert len(bucket_keys(stack)) == 30 and intents(settings) == 1  # could not delete during the outage

    schedule = create_celery(settings).conf.beat_schedule
    assert schedule["sweep-orphaned-objects"]["task"] == "worker.tasks.sweep_orphans"
    for name, value in {**stack.env, "SKINSCAN_ORPHAN_GRACE_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    fresh_settings()  # the task reads them
    from worker.tasks import sweep_orphans

    assert sweep_orphans.run() == 0 and intents(settings) == 1  # still down: nothing lost, tried again later
    state["down"] = False
    assert sweep_orphans.run() == 30
    assert bucket_keys(stack) == set() and intents(settings) == 0


def test_upload_outliving_the_grace_period_is_refused(stack, ham_files, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The sweeper takes an upload's intent while the request is still storing (it ran past the grace period):
    the request is refused with 503 instead of committing rows whose images were deleted, and keeps nothing."""
    from skinscan.orphans import sweep_orphans
    from skinscan.storage import S3Storage

    settings = stack.settings()
    client = make_client(settings)
    register_model(settings)
    real_put, puts = S3Storage.put, []

    def put(self: S3Storage, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        real_put(self, key, data, content_type)
        puts.append(key)
        if len(puts) == 5:
            assert sweep_orphans(settings, grace_seconds=0) == 5

    monkeypatch.setattr(S3Storage, "put", put)
    resp = client.submit(ham_files[:20])
    assert resp.status_code == 503 and "send it again" in resp.get_json()["error"], resp.get_json()
    assert len(puts) == 20
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert bucket_keys(stack) == set() and intents(settings) == 0


def test_images_stored_before_intents_are_swept_by_hand(stack, ham_files) -> None:  # type: ignore[no-untyped-def]
    """Images left by uploads before intents were recorded (clinic/job/image keys, no row) are deleted once by
    `skinscan sweep-orphans --legacy` after the grace period; images a row claims and heatmaps stay."""
    import uuid

    import boto3

    settings = stack.settings()
    client = make_client(settings)
    resp = client.submit(ham_files[:3])
    assert resp.status_code == 202
    job_id = resp.get_json()["id"]
    s3 = boto3.client("s3", endpoint_url=stack.env["S3_ENDPOINT_URL"])
    bucket = stack.env["S3_BUCKET"]
    claimed_old = f"{client.clinic_id}/{job_id}/{uuid.uuid4().hex}.jpg"  # an image stored the old way, with a row
    with session_scope(settings) as session:
        image = session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id)).first()
        image.storage_key = claimed_old
        heatmap = f"{client.clinic_id}/{job_id}/gradcam/{image.id}-0123456789abcdef.png"
    orphan = f"{client.clinic_id}/{uuid.uuid4().hex}/{uuid.uuid4().hex}.jpg"  # the old way, never committed
    for key in (claimed_old, heatmap, orphan):
        s3.put_object(Bucket=bucket, Key=key, Body=ham_files[0][1])
    stored = bucket_keys(stack)

    assert sweep_cli(stack, "--legacy") == 0  # within the grace period: nothing is touched
    assert bucket_keys(stack) == stored
    time.sleep(1.5)
    assert sweep_cli(stack, "--legacy", SKINSCAN_ORPHAN_GRACE_SECONDS="1") == 1
    assert bucket_keys(stack) == stored - {orphan}
