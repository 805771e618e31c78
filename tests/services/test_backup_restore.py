"""The backup and restore drill of the README on real services: PostgreSQL (pg_dump, pg_restore into a fresh
database), an S3 server (the bucket copied object by object into a fresh bucket, as `mc mirror` does), Redis and
Celery worker processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from private_services import Client as ApiClient
from realservices import PostgresDatabase
from sqlalchemy import select, text
from test_registry_rescore import (  # noqa: F401 - fixtures
    Client,
    cli,
    isic_files,
    register_and_promote_a,
    rstack,
    two_bundles,
)

from skinscan.db import dispose_engines, session_scope
from skinscan.tables import AuditEvent, Base, ImageRecord, Job

pytestmark = [pytest.mark.services, pytest.mark.slow]


def libpq_url(sqlalchemy_url: str) -> str:
    """The URL pg_dump and pg_restore take."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def every_row(settings: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every SkinScan table, in primary-key order (the audit trail, reviews and results included)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with session_scope(settings) as session:
        for table in Base.metadata.sorted_tables:
            out[table.name] = [tuple(r) for r in session.execute(
                select(table).order_by(*table.primary_key.columns)).all()]
    return out


def exports(client: Client, job_ids: list[str]) -> dict[str, Any]:
    """Every export and read a clinic has of its jobs: results CSV and JSON (history), metrics, reviews, changes."""
    out: dict[str, Any] = {}
    for job_id in job_ids:
        csv = client.get(f"/api/v1/jobs/{job_id}/results?format=csv")
        assert csv.status_code == 200
        out[f"{job_id}.csv"] = csv.get_data(as_text=True)
        out[f"{job_id}.json"] = client.get(f"/api/v1/jobs/{job_id}/results?history=true&limit=1000").get_json()
        out[f"{job_id}.metrics"] = client.get(f"/api/v1/jobs/{job_id}/metrics").get_json()
        out[f"{job_id}.reviews"] = client.get(f"/api/v1/jobs/{job_id}/reviews").get_json()
    out["changes.csv"] = client.get("/api/v1/changes?format=csv").get_data(as_text=True)
    out["runs"] = client.get("/api/v1/rescore-runs").get_json()
    out["models"] = client.get("/api/v1/models").get_json()
    return out


def copy_bucket(source: Any, target: Any) -> int:
    """Copy every object of one bucket into another (what `mc mirror` or `aws s3 sync` does); return how many."""
    keys = source.list_keys("")
    for key in keys:
        target.put(key, source.get(key))
    return len(keys)


def test_backup_restore_drill(rstack: Any, two_bundles: tuple[Path, Path],  # noqa: F811 - fixtures by name
                              isic2017_dir: Path, moto: Any, monkeypatch: pytest.MonkeyPatch,
                              fresh_settings: Callable[[], Any]) -> None:
    """Fill a deployment (two scored jobs, reviews, model B promoted and a re-score, a heatmap), back it up as the
    README says (pg_dump, then the bucket), restore both into fresh ones, start web and a worker on them: every
    row of every table, every export, review and audit row is as at the dump, every image readable, and the
    restored deployment scores. What changed between the dump and the bucket copy is handled as documented: a
    job uploaded then is absent and `skinscan check-storage --delete` removes its objects; a job deleted then
    comes back without images, is reported, and deleting it again settles it; an upload in flight at the dump
    is swept by the orphan sweeper."""
    from skinscan.orphans import begin_upload, sweep_orphans
    from skinscan.storage import S3Storage
    from web import create_app
    from worker.gradcam import compute_heatmap

    settings = rstack.settings()
    register_and_promote_a(two_bundles)
    rstack.worker()
    clinic = Client(settings, "drill")
    jobs = [clinic.submit(isic_files(isic2017_dir, 6))["id"], clinic.submit(isic_files(isic2017_dir, 4, 6))["id"],
            clinic.submit(isic_files(isic2017_dir, 2, 10))["id"]]
    for job_id in jobs:
        assert clinic.wait_job(job_id)["status"] == "done"
    with session_scope(settings) as session:
        images = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == jobs[0])
                                      .order_by(ImageRecord.position)))
    for image_id, decision in zip(images[:3], ("reviewed", "reviewed", "reviewed"), strict=True):
        answer = clinic.client.post(f"/api/v1/images/{image_id}/review", json={"decision": decision,
                                    "note": f"drill {image_id[:6]}"}, headers={"Authorization": f"Bearer {clinic.key}"})
        assert answer.status_code == 201, answer.get_json()
    assert cli("models", "promote", "rescore-b")[0] == 0
    code, out = cli("rescore", "--wait")
    assert code == 0, out
    assert compute_heatmap(images[0], "rescore-b", settings)
    before_exports = exports(clinic, jobs)
    assert before_exports["runs"]["runs"] and before_exports["models"]["production"] == "rescore-b"

    # --- the backup: the database dump first ... -----------------------------------------------------------
    inflight = begin_upload(settings, clinic.clinic_id, "f" * 32)  # an upload whose rows never commit
    source = S3Storage(settings.s3_bucket, moto.url)
    source.put(inflight.prefix + "0" * 32 + ".jpg", b"stored, never claimed")
    at_dump = every_row(settings)
    dump = rstack.tmp / "skinscan.dump"
    subprocess.run(["pg_dump", "--format=custom", "--file", str(dump), libpq_url(settings.database_url)],
                   check=True, timeout=120)
    # ... a job uploaded and another deleted after the dump, before the bucket copy ...
    late = clinic.submit(isic_files(isic2017_dir, 2, 12))["id"]
    assert clinic.wait_job(late)["status"] == "done"
    gone = clinic.client.delete(f"/api/v1/jobs/{jobs[2]}", headers={"Authorization": f"Bearer {clinic.key}"})
    assert gone.get_json()["complete"] is True
    # ... then the bucket.
    restored_bucket = S3Storage(f"{settings.s3_bucket}-restored", moto.url)
    restored_bucket.ensure_bucket()
    copied = copy_bucket(source, restored_bucket)
    late_keys = {k for k in source.list_keys("") if f"/{late}/" in k}
    assert late_keys and copied > len(late_keys)
    for w in rstack.workers:
        w.stop()

    # --- the restore: a fresh database from the dump, the bucket copy, a fresh Redis ----------------------
    fresh = PostgresDatabase()
    try:
        subprocess.run(["pg_restore", "--no-owner", "--exit-on-error", "--dbname", libpq_url(fresh.url),
                        str(dump)], check=True, timeout=120)
        # A machine of the restored deployment: its own model cache, so bundles come from the restored bucket.
        for name, value in {"DATABASE_URL": fresh.url, "S3_BUCKET": restored_bucket.bucket,
                            "SKINSCAN_MODEL_CACHE_DIR": str(rstack.tmp / "restored-cache")}.items():
            rstack.env[name] = value
            monkeypatch.setenv(name, value)
        fresh_settings()  # the commands run in this process read the restored deployment's settings
        redis.Redis.from_url(rstack.redis_url).flushdb()
        restored = rstack.settings()
        assert cli("migrate")[0] == 0  # already at head: nothing to do
        code, out = cli("check-storage")
        assert code == 1, out
        assert f"{jobs[2]}  2 images missing" in out and "1 under an unfinished upload" in out
        assert f"{len(late_keys)} claimed by nothing (run again with --delete" in out

        assert every_row(restored) == at_dump  # every job, result, review, model version and audit event

        # The clinic's own key on a web app of the restored deployment.
        restored_client = ApiClient(create_app(restored).test_client(), clinic.key, clinic.clinic_id, restored)
        assert exports(restored_client, jobs) == before_exports
        with session_scope(restored) as session:
            for image in session.scalars(select(ImageRecord).where(ImageRecord.job_id.in_(jobs[:2]))):
                data = restored_bucket.get(image.storage_key)
                assert data == source.get(image.storage_key) and len(data) == image.size
            assert session.get(Job, late) is None
            last_audit = max(e.id for e in session.scalars(select(AuditEvent)))
        # The documented handling of what happened between the dump and the bucket copy.
        assert cli("check-storage", "--delete")[0] == 1  # still missing the deleted job's images
        again = restored_client.client.delete(f"/api/v1/jobs/{jobs[2]}", headers=restored_client.headers())
        assert again.get_json()["deleted"] is True
        assert sweep_orphans(restored, grace_seconds=0) == 1  # the upload in flight at the dump
        code, out = cli("check-storage")
        assert code == 0 and "0 claimed by nothing" in out, out
        assert not {k for k in restored_bucket.list_keys("") if f"/{late}/" in k or f"/{jobs[2]}/" in k}

        # Web and worker on the restored services: a new job is scored with the restored production model,
        # fetched from the restored bucket, and its audit rows follow the restored ones.
        rstack.worker()
        new = restored_client.submit(isic_files(isic2017_dir, 2, 14)).get_json()["id"]
        body = restored_client.wait(new, timeout=600)
        assert body["status"] == "done" and body["model_version"] == "rescore-b"
        with session_scope(restored) as session:
            assert session.scalar(select(AuditEvent.id).where(AuditEvent.target_id == new)) > last_audit
            assert session.scalar(text("SELECT count(*) FROM reviews")) == 3
    finally:
        for w in rstack.workers:
            w.stop()
        dispose_engines()
        fresh.close()

