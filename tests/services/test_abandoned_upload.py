"""A multi-part upload that is never started (finalize=false, no /start) is closed after the upload timeout as a
job the clinic can read, on real services: its parts were scored while uploading, it ends `done` with a note,
its stored images stay with it (the orphan sweep leaves them) and go when the job is deleted."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select
from tests_helpers import replace

pytestmark = [pytest.mark.services]


def _pngs(n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(offset, offset + n):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (i * 5 % 256, 80, 150)).save(buf, "PNG")
        out.append((f"img{i:03d}.png", buf.getvalue()))
    return out


def _part(api: Any, job_id: str, files: list[tuple[str, bytes]]) -> Any:
    data = {"files": [(io.BytesIO(b), n) for n, b in files]}
    return api.client.post(f"/api/v1/jobs/{job_id}/images", data=data, headers=api.headers(),
                           content_type="multipart/form-data")


def test_abandoned_multipart_upload_is_closed_as_a_readable_job(stack: Any, api: Any) -> None:
    from skinscan.db import session_scope
    from skinscan.orphans import sweep_orphans
    from skinscan.storage import S3Storage
    from skinscan.tables import AuditEvent, ImageRecord
    from worker.stale_uploads import close_stale_uploads

    settings = stack.settings()
    stack.worker()
    first = api.submit(_pngs(20), finalize="false")
    assert first.status_code == 202, first.get_json()
    job_id = first.get_json()["id"]
    assert _part(api, job_id, _pngs(20, 20)).status_code == 202
    # Both parts are scored while the job is still uploading.
    deadline = time.monotonic() + 180
    while (body := api.get(f"/api/v1/jobs/{job_id}").get_json())["counts"]["scored"] < 40:
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    assert body["status"] == "uploading"

    assert close_stale_uploads(settings) == 0  # a recent upload is left alone
    time.sleep(1.5)
    assert close_stale_uploads(replace(settings, upload_timeout_seconds=1)) == 1
    body = api.wait(job_id, timeout=120)
    assert body["status"] == "done", body
    assert body["counts"] == {"total": 40, "scored": 40, "failed": 0, "refused": 0}, body
    assert "closed automatically with the 40 images received" in body["error"], body
    rows = api.get(f"/api/v1/jobs/{job_id}/results?limit=100").get_json()["results"]
    assert len(rows) == 40 and all(r["status"] == "scored" and r["predicted_label"] for r in rows)
    assert api.get(f"/api/v1/jobs/{job_id}/metrics").status_code == 200
    started = api.client.post(f"/api/v1/jobs/{job_id}/start", headers=api.headers())
    assert started.status_code == 409  # closed: no more parts, no second start
    assert _part(api, job_id, _pngs(1, 99)).status_code == 409

    bucket = S3Storage(settings.s3_bucket, settings.s3_endpoint_url)
    with session_scope(settings) as session:
        keys = list(session.scalars(select(ImageRecord.storage_key).where(ImageRecord.job_id == job_id)))
        assert session.scalar(select(AuditEvent.action).where(AuditEvent.target_id == job_id,
                                                              AuditEvent.action == "job.upload_closed"))
    assert len(keys) == 40 and all(bucket.exists(k) for k in keys)
    sweep_orphans(replace(settings, orphan_grace_seconds=0))  # claimed by the job's rows: kept
    assert all(bucket.exists(k) for k in keys)
    # The clinic deletes the job: nothing of it is left in the bucket.
    deleted = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers()).get_json()
    assert deleted["objects_left"] == 0, deleted
    assert not any(bucket.exists(k) for k in keys)

