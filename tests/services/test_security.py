"""Security on real services: hashed secrets, refusing unsafe production config, tenant isolation on every API
call, rate limits, headers, no file names in logs, metadata stripped before storage, and the audit trail."""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin
from private_services import Client, make_client
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select, text
from tests_helpers import replace

from skinscan.db import get_engine, session_scope
from skinscan.tables import AuditEvent, ImageRecord, Job

pytestmark = [pytest.mark.services]

# File names that identify a patient; none may reach a log line at INFO.
PATIENT_NAMES = ["Jane-Doe-1975-03-02-left-shoulder.jpg", "Patient-Oskar-Lindqvist-MRN-88231.png",
                 "Jane-Doe-1975-03-02-notes.txt", "Jane-Doe-1975-03-02-truncated.jpg"]


@pytest.fixture(scope="module")
def ham_images(ham_dir: Path) -> list[tuple[str, bytes]]:
    """Eight real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[2000:2008]
    return [(p.name, p.read_bytes()) for p in paths]


def score_in_process(settings: Any, job_id: str) -> None:
    """Score a job with the worker's own code in this process (no broker needed)."""
    from worker import pipeline

    with session_scope(settings) as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id,
                                                             ImageRecord.status == "pending")))
    pipeline.score_chunk(job_id, ids, settings)


def all_text_in_database(settings: Any) -> str:
    """Every row of every table as JSON text."""
    engine = get_engine(settings)
    chunks = []
    with engine.connect() as conn:
        for table in sa_inspect(engine).get_table_names():
            rows = conn.execute(text(f'SELECT row_to_json(t)::text FROM "{table}" t')).scalars()
            chunks += list(rows)
    return "\n".join(chunks)


# --- secrets ---------------------------------------------------------------------------------------------------

def test_keys_and_passwords_are_stored_hashed(stack) -> None:  # type: ignore[no-untyped-def]
    """No plaintext API key or password is anywhere in the database; keys compare in constant time."""
    from skinscan.security import clinic_for_key, hash_password, verify_password
    from skinscan.tables import User

    settings = stack.settings()
    client = make_client(settings)
    password = "correct horse battery staple 9"
    with session_scope(settings) as session:
        session.add(User(clinic_id=client.clinic_id, email="doc@example.org", password_hash=hash_password(password)))
    dump = all_text_in_database(settings)
    assert client.key not in dump and client.key[12:] not in dump and password not in dump
    assert hashlib.sha256(client.key.encode()).hexdigest() in dump
    with session_scope(settings) as session:
        user = session.scalars(select(User).where(User.email == "doc@example.org")).one()
        assert user.password_hash.startswith("scrypt:")
        assert verify_password(user, password) and not verify_password(user, password + "x")
        assert not verify_password(None, password)
        assert clinic_for_key(session, client.key).id == client.clinic_id
        assert clinic_for_key(session, client.key[:-1] + ("A" if client.key[-1] != "A" else "B")) is None
    assert "compare_digest" in inspect.getsource(clinic_for_key)
    assert client.get("/api/v1/jobs").status_code == 200


def test_production_refuses_the_default_secret_key(stack, monkeypatch, fresh_settings) -> None:  # type: ignore[no-untyped-def]
    """SKINSCAN_ENV=production without SECRET_KEY: create_app raises ConfigError; with one it starts with HSTS."""
    from skinscan.settings import ConfigError
    from web import create_app

    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SKINSCAN_ENV", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app()
    monkeypatch.setenv("SECRET_KEY", "a-long-random-production-secret-" + "x" * 32)
    app = create_app(fresh_settings())
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 200 and resp.headers["Strict-Transport-Security"].startswith("max-age=")


# --- tenant isolation ------------------------------------------------------------------------------------------

def api_rules(app: Any) -> list[tuple[str, str, list[str]]]:
    """(rule, method, argument names) of every API endpoint of the app."""
    out = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.rule, method, sorted(rule.arguments)))
    return out


def fill(rule: str, values: dict[str, str]) -> str:
    """Put argument values into a Flask rule."""
    import re

    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: values[m.group(1)], rule)


def test_clinics_cannot_reach_each_others_data(stack, ham_images) -> None:  # type: ignore[no-untyped-def]
    """Clinic B gets 404 on every API call naming clinic A's job or image, sees none of A's data in any listing,
    and cannot add images to or start A's job; calls without a key get 401."""
    settings = stack.settings()
    a = make_client(settings, "clinic-a")
    b = make_client(settings, "clinic-b")
    done = a.submit(ham_images[:3]).get_json()["id"]
    score_in_process(settings, done)
    open_job = a.submit(ham_images[3:5], finalize="false").get_json()["id"]
    with session_scope(settings) as session:
        image_id = session.scalar(select(ImageRecord.id).where(ImageRecord.job_id == done))
    secrets_of_a = [done, open_job, image_id, *[n for n, _ in ham_images[:5]]]
    values = {"job_id": done, "image_id": image_id}
    app = a.client.application
    rules = api_rules(app)
    assert {"/api/v1/jobs/<job_id>", "/api/v1/jobs/<job_id>/results", "/api/v1/jobs/<job_id>/metrics",
            "/api/v1/jobs/<job_id>/images", "/api/v1/jobs/<job_id>/start"} <= {r for r, _, _ in rules}
    checked = 0
    for rule, method, args in rules:
        if args and not set(args) <= set(values):
            continue  # not a clinic's object (e.g. a model version), or covered by its own module's tests
        for query in ("", "?format=csv"):
            path = fill(rule, {**values, "job_id": open_job if rule.endswith(("/images", "/start")) else done})
            resp = b.client.open(path + query, method=method, headers=b.headers())
            body = resp.get_data(as_text=True)
            if args:
                assert resp.status_code == 404, (method, path, resp.status_code, body[:300])
                assert resp.get_json()["error"]
            else:
                assert resp.status_code < 500, (method, path, resp.status_code)
            assert not any(s in body for s in secrets_of_a), (method, path, body[:300])
            if args and method == "GET":  # A itself reaches it (POSTs would change A's job)
                assert a.client.open(path + query, headers=a.headers()).status_code != 404, path
            unauthenticated = a.client.open(path + query, method=method)
            assert unauthenticated.status_code == 401 or rule.endswith("openapi.json"), (method, path)
            checked += 1
    assert checked >= 10
    assert b.get("/api/v1/jobs").get_json()["total"] == 0
    with session_scope(settings) as session:
        assert session.scalar(select(Job.status).where(Job.id == open_job)) == "uploading"
        assert len(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == open_job)).all()) == 2
    assert a.get(f"/api/v1/jobs/{done}/metrics").status_code == 200
    assert a.get(f"/api/v1/jobs/{done}/results").get_json()["total"] == 3


# --- rate limits -----------------------------------------------------------------------------------------------

def _fresh_window() -> None:
    """Wait out the end of a minute so a test's requests fall in one fixed window."""
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)


def _app_client(settings: Any, key: str) -> Client:
    from web import create_app

    return Client(create_app(settings).test_client(), key, "", settings)


def test_rate_limit_is_shared_through_redis(stack) -> None:  # type: ignore[no-untyped-def]
    """Over the limit a key gets 429 JSON with Retry-After, in every web process sharing Redis; other keys and
    the health checks are not affected; requests with bad keys count against the address."""
    settings = replace(stack.settings(), rate_limit_per_minute=5)
    assert settings.redis_url
    a = make_client(settings)
    b = make_client(settings)
    other_process = _app_client(settings, a.key)
    _fresh_window()
    assert [a.get("/api/v1/jobs").status_code for _ in range(3)] == [200] * 3
    assert [other_process.get("/api/v1/jobs").status_code for _ in range(2)] == [200] * 2
    for client in (a, other_process):
        resp = client.get("/api/v1/jobs")
        assert resp.status_code == 429
        body = resp.get_json()
        assert body["status"] == 429 and "rate limit" in body["error"]
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert b.get("/api/v1/jobs").status_code == 200
    assert a.client.get("/healthz").status_code == 200
    bad = [a.client.get("/api/v1/jobs", headers={"Authorization": "Bearer sk_not-a-real-key-0000"}).status_code
           for _ in range(7)]
    assert bad[:5] == [401] * 5 and bad[5:] == [429, 429]


def test_rate_limit_embedded_is_in_process_and_holds_without_redis(stack) -> None:  # type: ignore[no-untyped-def]
    """Without Redis each app counts in memory; if Redis is unreachable the app counts in memory too (served up
    to the limit, then refused: neither locked out nor unlimited)."""
    settings = replace(stack.settings(), redis_url=None, rate_limit_per_minute=3)
    a = make_client(settings)
    second = _app_client(settings, a.key)
    _fresh_window()
    assert [a.get("/api/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert second.get("/api/v1/jobs").status_code == 200  # another process has its own counters
    unreachable = replace(stack.settings(), redis_url="redis://127.0.0.1:1/0", rate_limit_per_minute=1)
    down = _app_client(unreachable, a.key)
    assert [down.get("/api/v1/jobs").status_code for _ in range(3)] == [200, 429, 429]
    off = _app_client(replace(settings, rate_limit_per_minute=0), a.key)
    assert all(off.get("/api/v1/jobs").status_code == 200 for _ in range(5))


# --- headers ---------------------------------------------------------------------------------------------------

def test_security_headers_on_every_kind_of_answer(stack) -> None:  # type: ignore[no-untyped-def]
    """JSON answers, errors and the health check all carry the security headers."""
    client = make_client(stack.settings())
    answers = [client.get("/api/v1/jobs"), client.get("/api/v1/jobs/nope"), client.client.get("/api/v1/jobs"),
               client.client.get("/healthz"), client.client.get("/api/v1/openapi.json"),
               client.client.post("/api/v1/jobs/x/start")]
    for resp in answers:
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "same-origin"
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "Strict-Transport-Security" not in resp.headers  # only in production, behind TLS
        if resp.status_code >= 400:
            assert resp.is_json and resp.get_json()["status"] == resp.status_code


# --- privacy ---------------------------------------------------------------------------------------------------

def test_no_file_names_in_logs(stack, ham_images, caplog) -> None:  # type: ignore[no-untyped-def]
    """Patient-identifying file names never appear in the web's or the worker's log at INFO."""
    caplog.set_level(logging.INFO)
    settings = stack.settings()
    client = make_client(settings)
    worker = stack.worker()
    files = [(PATIENT_NAMES[0], ham_images[0][1]),
             (PATIENT_NAMES[1], _png(Image.open(io.BytesIO(ham_images[1][1])))),
             (PATIENT_NAMES[2], b"free text about the patient"),
             (PATIENT_NAMES[3], ham_images[2][1][:1500])]
    resp = client.submit(files)
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    job = client.wait(job_id, timeout=600)
    assert job["counts"] == {"total": 3, "scored": 2, "failed": 1, "refused": 1}
    client.get(f"/api/v1/jobs/{job_id}/results")
    client.get(f"/api/v1/jobs/{job_id}/results?format=csv").get_data()
    client.get(f"/api/v1/jobs/{job_id}/metrics")
    worker.stop()
    logs = caplog.text + "\n" + worker.log()
    assert job_id in logs and "succeeded" in worker.log()  # the logs are there, and say what happened
    for name in PATIENT_NAMES:
        for part in (name, name.rsplit(".", 1)[0], "Jane-Doe", "Lindqvist", "MRN-88231"):
            assert part not in logs, part


def _png(img: Image.Image, info: PngImagePlugin.PngInfo | None = None) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", pnginfo=info)
    return out.getvalue()


def test_identifying_metadata_is_removed_before_storage(stack, ham_images) -> None:  # type: ignore[no-untyped-def]
    """A JPEG with EXIF GPS, date and camera serial and a PNG with text chunks are stored without them."""
    from skinscan.storage import S3Storage

    settings = stack.settings()
    client = make_client(settings)
    base = Image.open(io.BytesIO(ham_images[0][1]))
    exif = Image.Exif()
    exif[0x0132] = "2023:11:02 14:05:09"  # DateTime
    exif[0xA431] = "SN-20231102-XYZ"  # BodySerialNumber
    exif[0x010F] = "DermaCam"  # Make
    exif[0x8825] = {1: "N", 2: (59.0, 19.0, 44.0), 3: "E", 4: (18.0, 4.0, 7.0)}  # GPS
    out = io.BytesIO()
    base.save(out, "JPEG", quality=95, exif=exif, comment=b"Jane Doe 1975")
    jpeg = out.getvalue()
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe")
    info.add_text("Description", "MRN 88231, left shoulder", zip=True)
    info.add_itxt("Comment", "born 1975-03-02")
    png = _png(base, info)
    assert b"SN-20231102-XYZ" in jpeg and b"Jane Doe" in png
    resp = client.submit([("exif.jpg", jpeg), ("text.png", png)])
    assert resp.status_code == 202
    with session_scope(settings) as session:
        rows = dict(session.execute(select(ImageRecord.filename, ImageRecord.storage_key)
                                    .where(ImageRecord.job_id == resp.get_json()["id"])).all())
    s3 = S3Storage(settings.s3_bucket, settings.s3_endpoint_url)
    for name, key in rows.items():
        stored = s3.client.get_object(Bucket=settings.s3_bucket, Key=key)["Body"].read()
        assert client.clinic_id in key and name.split(".")[0] not in key
        for needle in (b"Exif", b"GPS", b"SN-20231102-XYZ", b"DermaCam", b"2023:11:02", b"Jane", b"MRN",
                       b"1975", b"tEXt", b"zTXt", b"iTXt"):
            assert needle not in stored, (name, needle)
        with Image.open(io.BytesIO(stored)) as img:
            assert not dict(img.getexif()) and img.size == base.size
            assert not {k for k in img.info if k not in ("jfif", "jfif_version", "jfif_unit", "jfif_density",
                                                           "dpi", "adobe", "adobe_transform", "progressive",
                                                           "progression")}


# --- audit -----------------------------------------------------------------------------------------------------

def test_audit_trail_records_create_view_export(stack, ham_images) -> None:  # type: ignore[no-untyped-def]
    """Creating a job, viewing its results and metrics and exporting CSV each leave an audit row; so does the
    first model put in production."""
    settings = stack.settings()
    client = make_client(settings, "audited-clinic")
    job_id = client.submit(ham_images[:2]).get_json()["id"]
    score_in_process(settings, job_id)
    assert client.get(f"/api/v1/jobs/{job_id}/results").status_code == 200
    assert client.get(f"/api/v1/jobs/{job_id}/results?format=csv").status_code == 200
    assert client.get(f"/api/v1/jobs/{job_id}/metrics").status_code == 200
    other = make_client(settings)
    assert other.get(f"/api/v1/jobs/{job_id}/results").status_code == 404
    with session_scope(settings) as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        mine = [(e.action, e.actor, e.clinic_id, e.target_type, e.target_id) for e in events
                if e.target_id == job_id]
        models = [e for e in events if e.action == "model.promote"]
    actor = "api-key:audited-clinic"
    cid = client.clinic_id
    assert mine == [("job.create", actor, cid, "job", job_id), ("job.view_results", actor, cid, "job", job_id),
                    ("job.export", actor, cid, "job", job_id), ("job.view_metrics", actor, cid, "job", job_id)]
    assert len(models) == 1 and models[0].actor == "system"
    assert all(e.at is not None for e in events)
