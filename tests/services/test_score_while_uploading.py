"""Scoring while a job uploads, on PostgreSQL, Redis, the S3 server and a Celery worker: each part is sent to the
workers as it commits, the job stays open until it is started, and nothing is scored twice."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.tables import ImageRecord, JobChunk, Prediction

pytestmark = [pytest.mark.services]


def _poll_until_scored(api: Any, job_id: str, n: int, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = api.get(f"/api/v1/jobs/{job_id}").get_json()
        if body["counts"]["scored"] >= n:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def _post(api: Any, path: str, data: dict[str, Any]) -> Any:
    return api.client.post(path, data=data, headers=api.headers(), content_type="multipart/form-data")


def test_parts_are_scored_before_the_job_is_started(stack, api, isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Part one is scored while the job is still uploading; part two adds only its own chunks; start with labels
    closes the job, which ends done with one prediction per image and its metrics."""
    files, labels = isic_test_images(24)
    stack.worker()
    first = api.submit(files[:12], finalize="false")
    assert first.status_code == 202, first.get_json()
    job_id = first.get_json()["id"]

    early = _poll_until_scored(api, job_id, 12)
    assert early["status"] == "uploading" and early["finished_at"] is None

    part = _post(api, f"/api/v1/jobs/{job_id}/images", {"files": [(io.BytesIO(b), n) for n, b in files[12:]]})
    assert part.status_code == 202 and part.get_json()["accepted"] == 12
    start = _post(api, f"/api/v1/jobs/{job_id}/start", {"labels": (io.BytesIO(labels), "labels.csv")})
    assert start.status_code == 202, start.get_json()

    job = api.wait(job_id)
    assert job["status"] == "done" and job["counts"] == {"total": 24, "scored": 24, "failed": 0, "refused": 0}
    settings = stack.settings()
    with session_scope(settings) as session:
        per_image = dict(session.execute(
            select(ImageRecord.id, func.count(Prediction.id))
            .outerjoin(Prediction, Prediction.image_id == ImageRecord.id)
            .where(ImageRecord.job_id == job_id).group_by(ImageRecord.id)).all())
        chunks = [list(ids) for ids in session.scalars(select(JobChunk.image_ids).where(JobChunk.job_id == job_id)
                                                        .order_by(JobChunk.seq))]
    assert len(per_image) == 24 and set(per_image.values()) == {1}
    sent = [i for ids in chunks for i in ids]
    assert sorted(sent) == sorted(per_image) and len(sent) == 24  # every image sent once, none twice
    metrics = api.get(f"/api/v1/jobs/{job_id}/metrics").get_json()["metrics"]
    assert metrics["counts"]["scored"] == 24 and metrics["labels_format"] == "isic2017"
    assert "balanced_accuracy" in metrics


def test_a_job_scored_entirely_while_open_finishes_at_start(stack, api, isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Every image scored before start: no chunk is left to finish the job, so start has a worker finish it."""
    files, _ = isic_test_images(6)
    stack.worker()
    job_id = api.submit(files, finalize="false").get_json()["id"]
    assert _poll_until_scored(api, job_id, 6)["status"] == "uploading"
    start = _post(api, f"/api/v1/jobs/{job_id}/start", {})
    assert start.status_code == 202, start.get_json()
    job = api.wait(job_id, timeout=60)
    assert job["status"] == "done" and job["counts"]["scored"] == 6
    assert api.get(f"/api/v1/jobs/{job_id}/metrics").status_code == 200
