"""A model bundle damaged in storage (one flipped byte) ends a job within two minutes, on real services: every
image fails with the checksum message, and the Model page and /readyz say the production bundle is unusable
until it is registered again."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_web_pages import Staff, make_user

pytestmark = [pytest.mark.services]
log = logging.getLogger(__name__)

BOUND = 120.0  # seconds from submit to the job's end


def _pngs(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (i * 7 % 256, 90, 160)).save(buf, "PNG")
        out.append((f"img{i:03d}.png", buf.getvalue()))
    return out


def test_damaged_stored_bundle_fails_the_job_with_the_reason(stack: Any, api: Any, service_bundle: Path) -> None:
    from skinscan.db import session_scope
    from skinscan.model.registry import ensure_production_model, register_bundle
    from skinscan.storage import S3Storage
    from web import create_app

    settings = stack.settings()
    with session_scope(settings) as session:
        row = ensure_production_model(session, settings)
        version, prefix = row.version, row.storage_prefix
    assert prefix is not None
    bucket = S3Storage(settings.s3_bucket, settings.s3_endpoint_url)
    data = bucket.get(prefix + "weights.pt")
    bucket.put(prefix + "weights.pt", data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    worker = stack.worker()

    started = time.monotonic()
    job = api.submit(_pngs(20)).get_json()  # two chunks of 16 and 4
    body = api.wait(job["id"], timeout=BOUND + 60)
    elapsed = time.monotonic() - started
    log.info("job with a damaged bundle ended %s in %.1f s", body["status"], elapsed)
    assert body["status"] == "failed" and body["counts"]["failed"] == 20, body
    assert elapsed < BOUND, f"the job took {elapsed:.0f} s to end"
    rows = api.get(f"/api/v1/jobs/{job['id']}/results?limit=100").get_json()["results"]
    assert len(rows) == 20
    for r in rows:
        assert r["status"] == "failed", r
        assert r["error"].startswith("the model bundle cannot be used: stored object "), r
        assert f"{prefix}weights.pt of model {version} does not match its checksum" in r["error"], r
    assert "does not match its checksum" in (body.get("error") or ""), body
    assert "does not match its checksum" in worker.log()

    ready = api.client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    state = ready.get_json()
    assert state["status"] == "degraded", state
    assert state["checks"]["model"] == f"error: production bundle {version} is unusable", state
    assert "weights.pt" in state["model_error"] and "does not match its checksum" in state["model_error"], state

    _, email = make_user(settings)
    page = Staff(create_app(settings), email).get("/model")
    assert page.status_code == 200
    assert 'id="bundle-unusable"' in page.text and "does not match its checksum" in page.text, page.text[-2000:]

    # Registering the bundle again stores it again: the error is gone and jobs are scored.
    with session_scope(settings) as session:
        repaired = register_bundle(session, service_bundle, "test", settings=settings)
        assert repaired.bundle_error is None
    assert bucket.get(prefix + "weights.pt") == data
    again = api.client.get("/readyz").get_json()
    assert again["status"] == "ok" and again["checks"]["model"] == "ok", again
    job = api.submit(_pngs(3)).get_json()
    body = api.wait(job["id"], timeout=BOUND)
    assert body["status"] == "done" and body["counts"]["scored"] == 3, body
    assert 'id="bundle-unusable"' not in Staff(create_app(settings), make_user(settings)[1]).get("/model").text
