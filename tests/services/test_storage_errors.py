"""Storage errors in the worker are classed right, on real PostgreSQL and an S3 server (issue 12, point 10): a
connection error while checking whether an object exists is an outage (retried), an object not found is looked
for again on later tries before its image fails, and a missing bucket is an outage, never a missing image."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from private_services import make_client
from sqlalchemy import select

from skinscan.db import session_scope
from skinscan.storage import LocalStorage, StorageError
from skinscan.tables import ImageRecord

pytestmark = [pytest.mark.services]


@pytest.fixture(scope="module")
def good_images(ham_dir: Path) -> list[tuple[str, bytes]]:
    """Three real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[5000:5003]
    return [(p.name, p.read_bytes()) for p in paths]


def submitted(stack: Any, files: list[tuple[str, bytes]]) -> tuple[Any, str, list[tuple[str, str]]]:
    """Submit files as a fresh clinic; return (settings, job id, [(image id, storage key)] in upload order)."""
    settings = stack.settings()
    job_id = make_client(settings).submit(files).get_json()["id"]
    with session_scope(settings) as session:
        rows = session.execute(select(ImageRecord.id, ImageRecord.storage_key).where(ImageRecord.job_id == job_id)
                               .order_by(ImageRecord.position)).all()
    return settings, job_id, [(i, k) for i, k in rows]


def warm_model(settings: Any, job_id: str) -> None:
    """Fetch the job's model bundle into this machine's cache now, so the storage fault a test makes hits the
    image reads (a bundle that cannot be fetched is an outage too, before any image is tried)."""
    from skinscan.model.registry import bundle_ref
    from skinscan.model.store import local_bundle
    from skinscan.tables import Job

    with session_scope(settings) as session:
        ref = bundle_ref(session, session.get(Job, job_id).model_version)
    local_bundle(ref, settings)


def states(settings: Any, job_id: str) -> list[tuple[str, str | None, int]]:
    """(status, error, attempts) of a job's images in upload order."""
    with session_scope(settings) as session:
        return [(r.status, r.error, r.attempts) for r in session.scalars(
            select(ImageRecord).where(ImageRecord.job_id == job_id).order_by(ImageRecord.position))]


def test_connection_error_in_existence_check_is_an_outage(stack, good_images, caplog) -> None:  # type: ignore[no-untyped-def]
    """S3 unreachable while the worker reads and then checks an object: the task fails as an outage (StorageError,
    retried with backoff), the images stay pending with the reason, and nothing is logged as an image error."""
    import boto3
    from botocore.config import Config

    from skinscan.storage import get_storage
    from worker import pipeline

    settings, job_id, rows = submitted(stack, good_images[:2])
    warm_model(settings, job_id)
    storage = get_storage(settings)
    # Fewer client retries than production, so the outage shows in seconds; the error is the same.
    storage.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=Config(
        retries={"max_attempts": 1}, connect_timeout=2, s3={"addressing_style": "path"}))
    stack.s3_proxy.cut()
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(StorageError):
            pipeline.score_chunk(job_id, [i for i, _ in rows], settings)
    finally:
        stack.s3_proxy.restore()
    assert [(s, a) for s, _, a in states(settings, job_id)] == [("pending", 1), ("pending", 1)]
    assert all(e.startswith("StorageError: ") for _, e, _ in states(settings, job_id))
    # SkinScan's own logs only: a pooled connection of an earlier test's (dropped) database that the garbage
    # collector finalises here logs through sqlalchemy.pool, which says nothing about this pipeline.
    own = [r for r in caplog.records if r.exc_info and r.name.split(".")[0] in ("worker", "skinscan", "web")]
    assert not own, [r.getMessage() for r in own]
    assert pipeline.score_chunk(job_id, [i for i, _ in rows], settings) == 2  # storage back: scored


def test_object_not_found_is_looked_for_again_then_scored(stack, good_images) -> None:  # type: ignore[no-untyped-def]
    """An object that is not there on the first try (a lagging replica, a restore in progress) keeps its image
    pending while its chunk-mates are scored; when it is back, the next try scores it."""
    from skinscan.storage import get_storage
    from worker import pipeline

    settings, job_id, rows = submitted(stack, good_images)
    storage = get_storage(settings)
    key = rows[1][1]
    saved = storage.get(key)
    storage.delete(key)
    with pytest.raises(pipeline.ChunkIncomplete):
        pipeline.score_chunk(job_id, [i for i, _ in rows], settings)
    first = states(settings, job_id)
    assert [s for s, _, _ in first] == ["scored", "pending", "scored"]
    assert "not found" in first[1][1]
    storage.put(key, saved, "image/jpeg")
    assert pipeline.score_chunk(job_id, [i for i, _ in rows], settings) == 1
    assert [s for s, _, _ in states(settings, job_id)] == ["scored"] * 3


def test_object_still_missing_fails_with_the_reason_after_its_tries(stack, good_images) -> None:  # type: ignore[no-untyped-def]
    """An object that stays missing fails its image with the reason after MISSING_ATTEMPTS tries, not before."""
    from skinscan.storage import get_storage
    from worker import pipeline

    settings, job_id, rows = submitted(stack, good_images[:2])
    get_storage(settings).delete(rows[0][1])
    deliveries = 0
    while True:
        deliveries += 1
        assert deliveries <= pipeline.MISSING_ATTEMPTS + 1
        try:
            pipeline.score_chunk(job_id, [i for i, _ in rows], settings)
            break
        except pipeline.ChunkIncomplete:
            continue
    assert deliveries == pipeline.MISSING_ATTEMPTS
    gone, kept = states(settings, job_id)
    assert gone[0] == "failed" and "missing" in gone[1] and gone[2] == pipeline.MISSING_ATTEMPTS
    assert kept[0] == "scored"


def test_missing_bucket_is_an_outage_not_missing_images(stack, good_images) -> None:  # type: ignore[no-untyped-def]
    """With the bucket gone, no image is failed as missing: the task fails as an outage naming the bucket, and
    once the bucket is back the images are scored."""
    from skinscan.storage import S3Storage
    from worker import pipeline

    settings, job_id, rows = submitted(stack, good_images[:2])
    warm_model(settings, job_id)
    admin = S3Storage(settings.s3_bucket, settings.s3_endpoint_url)
    saved = {k: admin.get(k) for k in admin.list_keys("")}  # the images and the stored model bundle
    for key in saved:
        admin.delete(key)
    admin.client.delete_bucket(Bucket=settings.s3_bucket)
    with pytest.raises(StorageError, match=f"bucket {settings.s3_bucket}"):
        pipeline.score_chunk(job_id, [i for i, _ in rows], settings)
    assert [(s, a) for s, _, a in states(settings, job_id)] == [("pending", 1), ("pending", 1)]
    assert all(f"bucket {settings.s3_bucket}" in e for _, e, _ in states(settings, job_id))
    admin.ensure_bucket()
    for key, data in saved.items():
        admin.put(key, data)
    assert pipeline.score_chunk(job_id, [i for i, _ in rows], settings) == 2


def test_local_images_folder_gone_is_an_outage(tmp_path: Path) -> None:
    """Embedded storage: a missing images folder (an unmounted volume) is an outage, not a missing object."""
    storage = LocalStorage(tmp_path / "images")
    storage.put("a/b.jpg", b"x")
    assert storage.exists("a/b.jpg") and not storage.exists("a/c.jpg")
    (tmp_path / "images" / "a" / "b.jpg").unlink()
    (tmp_path / "images" / "a").rmdir()
    (tmp_path / "images").rmdir()
    with pytest.raises(StorageError, match="images folder"):
        storage.exists("a/b.jpg")
