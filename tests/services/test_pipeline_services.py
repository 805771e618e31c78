"""The batch pipeline end to end on PostgreSQL, Redis, an S3 server over HTTP and a Celery worker process."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.labels import CLASSES
from skinscan.model.bundle import decide, load_bundle
from skinscan.tables import ImageRecord, Prediction

pytestmark = [pytest.mark.services]


def prediction_counts(settings, job_id: str) -> dict[str, int]:
    """Number of predictions per image of a job."""
    with session_scope(settings) as session:
        rows = session.execute(
            select(ImageRecord.id, func.count(Prediction.id))
                .outerjoin(Prediction, Prediction.image_id == ImageRecord.id)
            .where(ImageRecord.job_id == job_id).group_by(ImageRecord.id)
        ).all()
    return {i: n for i, n in rows}


def test_full_path_on_real_services(stack, api, isic_test_images, service_bundle):
    """Upload 120 ISIC 2017 test images with ground truth plus a corrupt one; everything comes back."""
    files, labels = isic_test_images(120)
    corrupt = ("truncated.jpg", files[0][1][:2500])
    stack.worker()
    resp = api.submit(files + [corrupt], labels)
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["status"] == "queued" and body["accepted"] == 121
    job = api.wait(body["id"])
    assert job["status"] == "done"
    assert job["counts"] == {"total": 121, "scored": 120, "failed": 1, "refused": 0}
    assert job["progress"] == 1.0

    settings = stack.settings()
    counts = prediction_counts(settings, body["id"])
    failed = [i for i, n in counts.items() if n == 0]
    assert len(failed) == 1 and sorted(n for n in counts.values() if n) == [1] * 120

    results = api.client.get(f"/api/v1/jobs/{body['id']}/results", headers=api.headers()).get_json()["results"]
    assert len(results) == 121
    by_name = {r["filename"]: r for r in results}
    bad = by_name["truncated.jpg"]
    assert bad["status"] == "failed" and "truncated" in bad["error"]
    good = by_name[files[5][0]]
    assert good["status"] == "scored" and set(good["probabilities"]) == set(CLASSES)
    assert abs(sum(good["probabilities"].values()) - 1) < 1e-3
    # The label is the bundle's decision: arg-max of log-probability plus its class-prior offsets.
    offsets = load_bundle(service_bundle, verify=False).logit_offsets
    row = np.array([[good["probabilities"][c] for c in CLASSES]])
    assert good["predicted_label"] == CLASSES[int(decide(row, offsets)[0])]
    assert 0 <= good["malignancy_score"] <= 1 and good["true_label"] in ("mel", "bkl", "nv")

    csv_resp = api.client.get(f"/api/v1/jobs/{body['id']}/results?format=csv", headers=api.headers())
    assert csv_resp.status_code == 200 and csv_resp.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(csv_resp.get_data(as_text=True))))
    assert len(rows) == 121 and {r["filename"] for r in rows} == set(by_name)
    assert rows[0]["prob_mel"] != "" and rows[0]["model_version"] == job["model_version"]

    metrics = api.client.get(f"/api/v1/jobs/{body['id']}/metrics", headers=api.headers()).get_json()["metrics"]
    assert metrics["counts"]["scored"] == 120 and sum(metrics["class_distribution"].values()) == 120
    for key in ("accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "melanoma"):
        assert key in metrics
    assert metrics["n_images"] == 120 and metrics["labels_format"] == "isic2017"
    assert metrics["per_class"]["mel"]["support"] + metrics["per_class"]["nv"]["support"] + \
        metrics["per_class"]["bkl"]["support"] == 120
    assert 0 <= metrics["balanced_accuracy"] <= 1 and metrics["melanoma"]["auc"] is not None

    # Stored objects are opaque ids, never the uploaded file names.
    with session_scope(settings) as session:
        keys = list(session.scalars(select(ImageRecord.storage_key).where(ImageRecord.job_id == body["id"])))
    assert all(k is None or "ISIC" not in k for k in keys)


def test_redelivered_chunk_changes_nothing(stack, api, isic_test_images):
    """Sending the same chunk again (as a broker redelivery would) leaves one prediction per image."""
    from skinscan.broker import celery_for
    from skinscan.jobs.dispatch import chunked
    from worker import pipeline

    files, _ = isic_test_images(20)
    stack.worker()
    body = api.submit(files).get_json()
    job = api.wait(body["id"])
    settings = stack.settings()
    with session_scope(settings) as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == body["id"])
                                   .order_by(ImageRecord.position)))
    # Once through the real worker (via the broker), once directly, with the image rows reset to pending as
    # if the first delivery had died between writing predictions and marking its images.
    for chunk in chunked(ids, 16):
        celery_for(settings).send_task("worker.tasks.score_chunk", args=[body["id"], chunk])
    with session_scope(settings) as session:
        session.execute(ImageRecord.__table__.update().where(ImageRecord.job_id == body["id"]).values(status="pending"))
    pipeline.score_chunk(body["id"], ids, settings)
    api.wait(body["id"])
    counts = prediction_counts(settings, body["id"])
    assert sorted(counts.values()) == [1] * 20
    again = api.client.get(f"/api/v1/jobs/{body['id']}", headers=api.headers()).get_json()
    assert again["counts"] == job["counts"] == {"total": 20, "scored": 20, "failed": 0, "refused": 0}


def test_clinics_are_isolated_and_keys_required(stack, api, isic_test_images):
    """Another clinic gets 404 for every call on a job; no key or a wrong key gets 401."""
    from tests_helpers import other_clinic_headers

    files, _ = isic_test_images(3)
    body = api.submit(files).get_json()
    other = other_clinic_headers(stack.settings())
    for path in ("", "/results", "/results?format=csv", "/metrics"):
        assert api.client.get(f"/api/v1/jobs/{body['id']}{path}", headers=other).status_code == 404
    listing = api.client.get("/api/v1/jobs", headers=other).get_json()
    assert listing["total"] == 0
    assert api.client.get(f"/api/v1/jobs/{body['id']}").status_code == 401
    wrong = api.client.get(f"/api/v1/jobs/{body['id']}", headers={"Authorization": "Bearer sk_wrongwrongwrong"})
    assert wrong.status_code == 401 and "invalid" in wrong.get_json()["error"]
    assert api.client.get("/api/v1/jobs", headers={"Authorization": "Basic abc"}).status_code == 401


def test_readiness_reports_each_service(stack, api):
    """/readyz checks database, broker and storage; it names storage when the S3 server is cut off."""
    ok = api.client.get("/readyz").get_json()
    assert ok["status"] == "ok" and set(ok["checks"]) == {"database", "broker", "storage", "model"}
    assert ok["checks"]["model"] == "ok"  # the production bundle is not marked unusable
    stack.s3_proxy.cut()
    try:
        resp = api.client.get("/readyz")
        assert resp.status_code == 503 and resp.get_json()["checks"]["storage"].startswith("error")
    finally:
        stack.s3_proxy.restore()


def test_migrations_one_head_and_down_up_on_postgres(stack):
    """Alembic has one head; downgrade to base and upgrade again both work on PostgreSQL."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect

    from skinscan.db import get_engine
    from skinscan.migrate import alembic_config, downgrade, upgrade

    settings = stack.settings()
    assert len(ScriptDirectory.from_config(alembic_config(settings)).get_heads()) == 1
    downgrade(settings, "base")
    assert set(inspect(get_engine(settings)).get_table_names()) <= {"alembic_version"}
    upgrade(settings)
    assert {"jobs", "images", "predictions", "clinics"} <= set(inspect(get_engine(settings)).get_table_names())
