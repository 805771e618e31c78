"""Faults on real services lose nothing: every image ends with its one prediction, its status and its tries counted.

Each test scores a job of 200 real HAM10000 images with real `skinscan worker` processes on PostgreSQL, Redis and
an S3 server, and breaks something mid-job: SIGKILL of a worker (twice), a Redis restart, a PostgreSQL restart,
the S3 server unreachable for 20 seconds, two workers on one queue, the web process killed during an upload, an
image whose stored object is gone, and a poison image that crashes every worker that scores it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from private_services import (
    PostgresCluster,
    RedisServer,
    ServiceProcess,
    make_client,
    rewire,
)
from realservices import free_port, wait_port
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.tables import ImageRecord, Job, JobMetrics, Prediction

pytestmark = [pytest.mark.services, pytest.mark.slow]

N_IMAGES = 200
# How the processes of these tests behave: small chunks so a job lasts long enough to break it mid-way,
# a quick stalled-job sweep, and the stack's 20 s visibility timeout and 15 s stall threshold.
FAULT_ENV = {"SKINSCAN_CHUNK_SIZE": "8", "SKINSCAN_SWEEP_INTERVAL_SECONDS": "3"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis that these tests may restart (never the machine's shared one)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture()
def lab(stack, redis_server):  # type: ignore[no-untyped-def]
    """The stack on the private Redis, with the fault settings in every process it starts."""
    redis_server.flush()
    rewire(stack, redis_url=redis_server.url)
    stack.env.update(FAULT_ENV)
    return stack


@pytest.fixture()
def spawn(lab) -> Iterator[Callable[..., ServiceProcess]]:  # type: ignore[no-untyped-def]
    """Start `skinscan <args>` processes (beat, web) for the stack; all are stopped at the end."""
    procs: list[ServiceProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess({**lab.env, **(env or {})}, lab.tmp / f"{args[0]}{len(procs)}.log", *args).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def job_files(ham_dir: Path) -> list[tuple[str, bytes]]:
    """200 real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[1000:1000 + N_IMAGES]
    return [(p.name, p.read_bytes()) for p in paths]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll check() until it returns something truthy; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - a service may be down for a moment
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def in_flight(settings: Any, job_id: str) -> set[str]:
    """Ids of a job's images a worker has claimed but not finished (pending with an attempt counted)."""
    with session_scope(settings) as session:
        return set(session.scalars(select(ImageRecord.id)
            .where(ImageRecord.job_id == job_id, ImageRecord.status == "pending",
                                                          ImageRecord.attempts > 0)))


def scored(settings: Any, job_id: str) -> int:
    """How many of a job's images are scored."""
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(ImageRecord)
                              .where(ImageRecord.job_id == job_id, ImageRecord.status == "scored")) or 0


def assert_exactly_once(settings: Any, job_id: str, n: int = N_IMAGES, retried: frozenset[str] = frozenset(),
                        first_try_only: bool = False) -> dict[str, int]:
    """The job ends as a redelivery must leave it; return each image's attempts.

    The unique (image, model version) constraint makes a second prediction impossible, so what is checked is what
    can go wrong: an image left without its prediction (or scored by another model version), job counters that
    disagree with the image rows, images not `scored` or still carrying an error from a failed try, and attempts
    that were not counted (every image tried at least once, each image in `retried` at least twice, none given up;
    with first_try_only, no image tried twice).
    """
    from worker.pipeline import MAX_ATTEMPTS

    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "done", job and (job.status, job.error)
        assert (job.total, job.scored, job.failed) == (n, n, 0), (job.total, job.scored, job.failed)
        assert job.progress == 1.0 and job.finished_at is not None and job.error is None
        assert session.get(JobMetrics, (job_id, job.model_version)) is not None  # stored once no image was pending
        images = session.execute(select(ImageRecord.id, ImageRecord.status, ImageRecord.error, ImageRecord.attempts)
                                 .where(ImageRecord.job_id == job_id)).all()
        predicted = session.execute(select(Prediction.image_id, Prediction.model_version).join(ImageRecord)
                                    .where(ImageRecord.job_id == job_id)).all()
    assert len(images) == n
    statuses = {status for _, status, _, _ in images}
    assert statuses == {"scored"}, statuses
    left_errors = {i: e for i, _, e, _ in images if e is not None}
    assert not left_errors, left_errors  # a try that failed, then succeeded, leaves no error behind
    assert {v for _, v in predicted} == {job.model_version}
    ids = {i for i, _, _, _ in images}
    assert {i for i, _ in predicted} == ids and len(predicted) == n, sorted(ids - {i for i, _ in predicted})[:5]
    tries = {i: a for i, _, _, a in images}
    assert all(1 <= a < MAX_ATTEMPTS for a in tries.values()), sorted(tries.values())
    assert all(tries[i] >= 2 for i in retried), {i: tries[i] for i in retried}
    if first_try_only:
        assert set(tries.values()) == {1}, sorted(tries.values())
    return tries


def submit(lab, job_files: list[tuple[str, bytes]]) -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    """Create a clinic and submit the job; return the client and the job id."""
    client = make_client(lab.settings())
    resp = client.submit(job_files)
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["accepted"] == len(job_files)
    return client, resp.get_json()["id"]


def test_worker_killed_twice_mid_job(lab, spawn, job_files) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the worker while it scores a chunk, twice, restarting it each time: the lost chunks come back."""
    settings = lab.settings()
    spawn("beat")
    worker = lab.worker()
    client, job_id = submit(lab, job_files)
    killed: set[str] = set()
    floor = 16
    for _ in range(2):
        # Kill only after some chunks were scored, and while the worker holds one (claimed, not written).
        wait_for(lambda done=frozenset(killed), floor=floor: scored(settings, job_id) >= floor
                 and in_flight(settings, job_id) - done, 600, "a chunk in flight mid-job", 0.05)
        worker.kill()
        # What the dead worker held is read after its death: an image seen in flight just before the kill may have
        # been written in between, and then it was never redelivered (nor tried twice).
        time.sleep(0.5)  # let the database finish with the dead worker's connection
        killed |= in_flight(settings, job_id)
        floor = scored(settings, job_id) + 8
        assert floor - 8 < N_IMAGES
        worker = lab.worker()
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done", job
    assert killed  # the killed chunks were scored by a later delivery, their tries counted
    assert_exactly_once(settings, job_id, retried=frozenset(killed))


def test_two_workers_on_one_queue(lab, job_files) -> None:  # type: ignore[no-untyped-def]
    """Two worker processes consume one queue: both take chunks, and each image is scored exactly once."""
    settings = lab.settings()
    workers = [lab.worker(), lab.worker()]
    client, job_id = submit(lab, job_files)
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done", job
    assert_exactly_once(settings, job_id, first_try_only=True)  # no chunk was taken by both workers
    for w in workers:
        assert "score_chunk" in w.log() and "succeeded" in w.log(), w.log()[-2000:]


def test_redis_restarted_mid_job(lab, redis_server, spawn, job_files) -> None:  # type: ignore[no-untyped-def]
    """The broker restarts empty mid-job (queued and unacked messages gone): the sweeper sends the rest again."""
    settings = lab.settings()
    spawn("beat")
    lab.worker()
    client, job_id = submit(lab, job_files)
    wait_for(lambda: scored(settings, job_id) >= 16, 600, "two chunks scored")
    redis_server.restart(down_for=1.0)
    assert scored(settings, job_id) < N_IMAGES
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done", job
    assert_exactly_once(settings, job_id)
    assert "requeued" in "".join(w.log() for w in lab.workers)  # the sweeper, not luck, brought the rest back


@pytest.fixture()
def private_pg(lab) -> Iterator[PostgresCluster]:  # type: ignore[no-untyped-def]
    """A private PostgreSQL cluster, migrated, that the stack now uses."""
    cluster = PostgresCluster()
    try:
        rewire(lab, database_url=cluster.url)
        yield cluster
    finally:
        for w in lab.workers:
            w.stop()
        from skinscan.db import dispose_engines

        dispose_engines()
        cluster.close()


def test_postgres_restarted_mid_job(lab, private_pg, job_files) -> None:  # type: ignore[no-untyped-def]
    """The database goes down for 3 seconds mid-job: tasks retry with backoff and the job finishes exactly once."""
    settings = lab.settings()
    lab.worker()
    client, job_id = submit(lab, job_files)
    wait_for(lambda: scored(settings, job_id) >= 16, 600, "two chunks scored")
    assert scored(settings, job_id) < N_IMAGES
    private_pg.restart(down_for=3.0)
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done", job
    assert_exactly_once(settings, job_id)


def test_s3_unreachable_for_20_seconds(lab, spawn, job_files) -> None:  # type: ignore[no-untyped-def]
    """The S3 server is unreachable for 20 seconds mid-job: reads retry with backoff; nothing lost or doubled."""
    settings = lab.settings()
    spawn("beat")
    worker = lab.worker()
    client, job_id = submit(lab, job_files)
    wait_for(lambda: scored(settings, job_id) >= 16, 600, "two chunks scored")
    lab.s3_proxy.cut()
    try:
        before = scored(settings, job_id)
        time.sleep(20)
        during = scored(settings, job_id)
    finally:
        lab.s3_proxy.restore()
    assert during - before <= 16 and during < N_IMAGES  # reads were blocked: at most the chunks in hand finished
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done", job
    tries = assert_exactly_once(settings, job_id)
    assert max(tries.values()) >= 2  # the reads that hit the outage were tried again and counted
    assert worker.proc.poll() is None  # the worker rode out the outage


def test_missing_object_fails_that_image_only(lab, job_files) -> None:  # type: ignore[no-untyped-def]
    """An image whose stored object was deleted fails with that reason after pipeline.MISSING_ATTEMPTS tries (the
    task's backoff between them); its chunk-mates are scored meanwhile."""
    from skinscan.storage import get_storage
    from worker.pipeline import MISSING_ATTEMPTS

    settings = lab.settings()
    client, job_id = submit(lab, job_files[:40])
    with session_scope(settings) as session:
        gone_id, key = session.execute(select(ImageRecord.id, ImageRecord.storage_key)
            .where(ImageRecord.job_id == job_id)
                                       .order_by(ImageRecord.position).offset(3).limit(1)).one()
    get_storage(settings).delete(key)
    lab.worker()
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done" and job["counts"] == {"total": 40, "scored": 39, "failed": 1, "refused": 0}, job
    with session_scope(settings) as session:
        gone = session.get(ImageRecord, gone_id)
        assert gone.status == "failed" and "missing" in gone.error and gone.attempts == MISSING_ATTEMPTS
        assert session.scalar(select(func.count()).select_from(Prediction).join(ImageRecord)
                              .where(ImageRecord.job_id == job_id)) == 39


class Crash(BaseException):
    """Stands for the death of the worker process: nothing after it in the task runs (not an Exception)."""


@pytest.mark.parametrize("fault", ["crash", "error"])
def test_poison_image_is_given_up_alone(lab, job_files, monkeypatch, fault: str) -> None:  # type: ignore[no-untyped-def]
    """An image that crashes (or breaks) the scorer every time ends failed with its reason after MAX_ATTEMPTS
    deliveries; the other images of its chunk are scored exactly once and no delivery loops forever."""
    from skinscan.model.scorer import Scorer
    from worker import pipeline

    settings = lab.settings()
    client, job_id = submit(lab, job_files[:16])
    with session_scope(settings) as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
            .order_by(ImageRecord.position)))
        poison_key = session.scalar(select(ImageRecord.storage_key).where(ImageRecord.id == ids[5]))
    from skinscan.storage import get_storage

    stored_poison = get_storage(settings).get(poison_key)
    original = Scorer.prepare

    def prepare(self: Scorer, data: bytes) -> Any:
        if data == stored_poison:
            if fault == "crash":
                raise Crash("worker process died decoding this image")
            raise RuntimeError("decoder blew up")
        return original(self, data)

    monkeypatch.setattr(Scorer, "prepare", prepare)
    deliveries = 0
    while True:  # each loop is one (re)delivery of the chunk's message, as the broker would make it
        deliveries += 1
        assert deliveries <= pipeline.MAX_ATTEMPTS + 2, "the chunk keeps being redelivered"
        try:
            pipeline.score_chunk(job_id, ids, settings)
            break
        except (Crash, pipeline.ChunkIncomplete):
            continue
    assert deliveries == pipeline.MAX_ATTEMPTS + 1
    job = client.wait(job_id, timeout=600)
    assert job["status"] == "done" and job["counts"] == {"total": 16, "scored": 15, "failed": 1, "refused": 0}
    with session_scope(settings) as session:
        poison = session.get(ImageRecord, ids[5])
        assert poison.status == "failed" and f"in {pipeline.MAX_ATTEMPTS} attempts" in poison.error
        assert poison.attempts == pipeline.MAX_ATTEMPTS
        if fault == "error":
            assert "RuntimeError: decoder blew up" in poison.error
        version = session.get(Job, job_id).model_version
        predicted = set(session.scalars(select(Prediction.image_id).where(Prediction.model_version == version,
                                                                          Prediction.image_id.in_(ids))))
        mates = session.execute(select(ImageRecord.id, ImageRecord.status, ImageRecord.error, ImageRecord.attempts)
                                .where(ImageRecord.job_id == job_id, ImageRecord.id != ids[5])).all()
    assert predicted == set(ids) - {ids[5]}  # every chunk-mate has its prediction, the poison image none
    # The first delivery tried the chunk as one batch, the second each image alone: two tries, and the error the
    # failed batch noted on every image is cleared when it is scored.
    assert {(status, error, tries) for _, status, error, tries in mates} == {("scored", None, 2)}


def _slow_upload(port: int, path: str, key: str, total: int, send: int, parts: list[bytes]) -> socket.socket:
    """Open a multipart POST announcing `total` body bytes and send only the first `send` of them."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="files"; filename="img%d.jpg"\r\n'
        % i + b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n" for i, data in enumerate(parts))
    body = (body * (total // len(body) + 1))[:total]
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n")
    sock.sendall(head.encode() + body[:send])
    return sock


def test_web_killed_during_upload(lab, spawn, job_files) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the web server mid-upload: no half-made job is queued or running; an upload in parts that never
    finished is closed with the images it holds by the stale-upload sweeper, saying why."""
    settings = lab.settings()
    client = make_client(settings)
    port = free_port()
    web = spawn("web", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--threads", "4")
    wait_port("127.0.0.1", port, 600)
    base = f"http://127.0.0.1:{port}/api/v1"
    auth = {"Authorization": f"Bearer {client.key}"}
    first = requests.post(f"{base}/jobs", headers=auth, data={"finalize": "false"},
                          files=[("files", (n, b, "image/jpeg")) for n, b in job_files[:3]], timeout=120)
    assert first.status_code == 202, first.text
    parts_job = first.json()["id"]
    assert first.json()["status"] == "uploading"

    parts = [b for _, b in job_files[:50]]
    size = sum(len(p) for p in parts)
    streams = [
        _slow_upload(port, "/api/v1/jobs", client.key, size * 4, size, parts),  # a new job, body half sent
        _slow_upload(port, f"/api/v1/jobs/{parts_job}/images", client.key, size * 4, size, parts),  # a part
    ]
    time.sleep(2)
    os.killpg(web.proc.pid, signal.SIGKILL)
    web.proc.wait(10)
    for s in streams:
        s.close()

    with session_scope(settings) as session:
        jobs = session.execute(select(Job.id, Job.status).where(Job.clinic_id == client.clinic_id)).all()
        images = session.scalar(select(func.count()).select_from(ImageRecord).where(ImageRecord.job_id == parts_job))
    assert jobs == [(parts_job, "uploading")]  # no other job was made, none looks queued or running
    assert images == 3  # the killed part added nothing
    listing = client.get("/api/v1/jobs").get_json()["jobs"]
    assert [(j["id"], j["status"]) for j in listing] == [(parts_job, "uploading")]

    # The sweeper leaves a recent upload alone and closes one idle past the limit with the images it holds,
    # saying why (tests/services/test_abandoned_upload.py follows such a job to `done`).
    from tests_helpers import replace

    from worker.stale_uploads import close_stale_uploads

    assert close_stale_uploads(settings) == 0
    time.sleep(1.5)
    assert close_stale_uploads(replace(settings, upload_timeout_seconds=1)) == 1
    job = client.get(f"/api/v1/jobs/{parts_job}").get_json()
    assert job["status"] == "queued" and "never finished" in job["error"] and "closed automatically" in job["error"]
    assert job["counts"]["total"] == 3
    started = client.client.post(f"/api/v1/jobs/{parts_job}/start", headers=client.headers())
    assert started.status_code == 409
