"""Model bundles across machines on PostgreSQL, Redis and an S3 server: nothing but those three is shared.

Each "machine" is a process (or this test process) with a data folder of its own: a bundle registered on one is
uploaded to object storage, fetched into another's cache on first use and verified there. Also: concurrent first
starts put exactly one version in production, and two nightly tasks of the same night start one re-score run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image as PILImage
from realservices import ROOT, WorkerProcess
from sqlalchemy import func, select

pytestmark = [pytest.mark.services]

PASSWORD = "distribution test password"
WAIT = 300.0


def tiny_bundle(out: Path, version: str, seed: int = 0) -> Path:
    """A tiny untrained bundle (as tests/services/conftest.py's service_bundle) with a model card and a plot."""
    import torch

    from training.export import create_model, save_bundle

    torch.manual_seed(seed)
    save_bundle(create_model("mobilenet_v3_small", 7), out,
                {"architecture": "mobilenet_v3_small", "version": version, "input_size": 64, "resize_size": 73,
                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "temperature": 1.0}, onnx=False)
    (out / "MODEL_CARD.md").write_text(f"# Model card of {version}\n\nThis card travels inside bundle {version}.\n")
    png = io.BytesIO()
    PILImage.new("RGB", (20, 10), (200, 30, 30)).save(png, format="PNG")
    (out / "tiny-test_roc.png").write_bytes(png.getvalue())
    return out


def settings_with(env: dict[str, str]) -> Any:
    """Settings as a process with this environment reads them."""
    from skinscan.settings import read_settings

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return read_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def skinscan(env: dict[str, str], *argv: str, stdin: str | None = None) -> str:
    """Run `skinscan ARGV` in a process of its own with this environment; return its output (it must succeed)."""
    done = subprocess.run([sys.executable, "-m", "skinscan.cli", *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=WAIT, input=stdin)
    assert done.returncode == 0, f"skinscan {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def machine(stack: Any, tmp_path: Path, name: str) -> dict[str, str]:
    """The environment of one more machine: the stack's services, a data folder (and model cache) of its own."""
    env = {**stack.env, "SKINSCAN_DATA_DIR": str(tmp_path / name)}
    env.pop("SKINSCAN_MODEL_CACHE_DIR", None)
    return env


def jpegs(n: int) -> list[tuple[str, bytes]]:
    """n small real JPEGs of random pixels."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 256, (80, 80, 3), dtype=np.uint8)
        PILImage.fromarray(pixels).save(buf, format="JPEG")
        out.append((f"lesion-{i}.jpg", buf.getvalue()))
    return out


def sign_in(app: Any, settings: Any) -> Any:
    """A test client of app signed in as a fresh clinic's user."""
    from skinscan.db import session_scope
    from skinscan.security import hash_password
    from skinscan.tables import Clinic, User

    email = f"staff-{uuid.uuid4().hex[:6]}@clinic.example"
    with session_scope(settings) as session:
        clinic = Clinic(name=f"clinic-{uuid.uuid4().hex[:6]}")
        session.add(clinic)
        session.flush()
        session.add(User(clinic_id=clinic.id, email=email, password_hash=hash_password(PASSWORD)))
    client = app.test_client()
    page = client.get("/signin").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page) or re.search(
        r'name="csrf-token" content="([^"]+)"', page)
    assert token
    response = client.post("/signin", data={"email": email, "password": PASSWORD, "csrf_token": token.group(1)})
    assert response.status_code == 302, response.text
    return client


def test_bundle_registered_on_one_machine_is_served_on_others(stack: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                fresh_settings: Callable[[], Any]) -> None:
    """Register and promote a bundle on machine R (then delete it there); a worker on machine K, whose cache
    holds a damaged copy, detects it, fetches the bundle again and scores a job submitted on web machine W; W's
    Model page shows the card and plot from inside the bundle; a damaged stored object is refused, not served."""
    from skinscan.db import session_scope
    from skinscan.model.registry import bundle_ref
    from skinscan.model.store import BundleStoreError, cache_folder, forget_verified
    from skinscan.storage import S3Storage
    from skinscan.tables import AuditEvent, ModelVersion
    from web import create_app

    version = f"distributed-{uuid.uuid4().hex[:6]}"
    source = tiny_bundle(tmp_path / "source-bundle", version)
    files = sorted(p.name for p in source.iterdir())

    # Machine R registers and promotes, each command a process of its own; then its bundle and data are gone.
    registrar = machine(stack, tmp_path, "machine-r")
    out = skinscan(registrar, "models", "register", str(source), "--backend", "torch")
    assert f"registered {version}" in out and "stored under models/" in out
    assert f"{version} is in production" in skinscan(registrar, "models", "promote", version)
    shutil.rmtree(source)
    shutil.rmtree(tmp_path / "machine-r")

    web_env = machine(stack, tmp_path, "machine-w")
    web_settings = settings_with(web_env)
    with session_scope(web_settings) as session:
        row = session.get(ModelVersion, version)
        assert row is not None and row.status == "production"
        prefix, checksum = row.storage_prefix, row.bundle_checksum
        assert prefix == f"models/{version}/{checksum}/"
        ref = bundle_ref(session, version)
        assert session.scalar(select(func.count()).select_from(AuditEvent)
                              .where(AuditEvent.action == "model.register", AuditEvent.target_id == version)) == 1
    bucket = S3Storage(web_settings.s3_bucket, web_settings.s3_endpoint_url)
    assert sorted(k[len(prefix):] for k in bucket.list_keys(prefix)) == sorted([*files, "bundle-manifest.json"])

    # Machine K: its cache already holds the bundle, damaged (a flipped byte in the weights).
    worker_env = machine(stack, tmp_path, "machine-k")
    worker_settings = settings_with(worker_env)
    skinscan_python = ("from skinscan.db import session_scope; from skinscan.model.registry import bundle_path_for; "
                       "from skinscan.settings import load_settings\n"
                       f"with session_scope() as s: print(bundle_path_for(s, {version!r}, load_settings()))")
    done = subprocess.run([sys.executable, "-c", skinscan_python], env=worker_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    cached = cache_folder(ref, worker_settings)
    assert Path(done.stdout.strip()) == cached and str(cached).startswith(str(tmp_path / "machine-k"))
    weights = cached / "weights.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    worker = WorkerProcess(worker_env, tmp_path / "worker-k.log", 1, "wk").start()
    stack.workers.append(worker)

    # Machine W (this process) takes the upload; K scores it with the registered version.
    monkeypatch.setenv("SKINSCAN_DATA_DIR", web_env["SKINSCAN_DATA_DIR"])
    fresh_settings()  # what this process's code reads from now on
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic

    app = create_app(web_settings)
    with session_scope(web_settings) as session:
        clinic = Clinic(name=f"clinic-{uuid.uuid4().hex[:6]}")
        session.add(clinic)
        session.flush()
        key = create_api_key(session, clinic)
    headers = {"Authorization": f"Bearer {key}"}
    api = app.test_client()
    resp = api.post("/api/v1/jobs", data={"files": [(io.BytesIO(b), n) for n, b in jpegs(3)]}, headers=headers,
                    content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    deadline = time.monotonic() + WAIT
    while (body := api.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, f"job still {body['status']}; worker log:\n" + \
            (tmp_path / "worker-k.log").read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    assert body["status"] == "done" and body["model_version"] == version, body
    assert body["counts"]["scored"] == 3
    log = (tmp_path / "worker-k.log").read_text(errors="replace")
    assert f"cached bundle of model {version}" in log and "weights.pt does not match its checksum" in log
    assert weights.read_bytes() == good  # fetched again, intact

    # W's Model page: the card and the plot come from inside the bundle, fetched into W's own cache.
    page_client = sign_in(app, web_settings)
    page = page_client.get("/model")
    assert page.status_code == 200
    assert f"This card travels inside bundle {version}." in page.text
    assert "/model/plots/tiny-test_roc.png" in page.text
    plot = page_client.get("/model/plots/tiny-test_roc.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png"
    web_cache = cache_folder(ref, web_settings)
    assert str(web_cache).startswith(str(tmp_path / "machine-w")) and plot.data == (web_cache / "tiny-test_roc.png"
                                                                                    ).read_bytes()
    models = api.get("/api/v1/models", headers=headers).get_json()
    assert models["production"] == version
    (listed,) = [m for m in models["models"] if m["version"] == version]
    assert listed["stored"] is True and listed["bundle_checksum"] == checksum and "path" not in listed
    manifest = json.loads((web_cache / "bundle-manifest.json").read_text())
    assert hashlib.sha256((web_cache / "bundle-manifest.json").read_bytes()).hexdigest() == checksum
    assert sorted(manifest["files"]) == files

    # A damaged object in storage: a machine with an empty cache refuses it (clear error), and its Model page
    # shows no card rather than a wrong one.
    bucket.put(prefix + "weights.pt", b"not the registered weights")
    fresh_env = machine(stack, tmp_path, "machine-x")
    fresh = settings_with(fresh_env)
    forget_verified()
    from skinscan.model.store import local_bundle

    with pytest.raises(BundleStoreError, match=f"weights.pt of model {version} does not match its checksum"):
        local_bundle(ref, fresh)
    assert not cache_folder(ref, fresh).exists()
    monkeypatch.setenv("SKINSCAN_DATA_DIR", fresh_env["SKINSCAN_DATA_DIR"])
    fresh_settings()  # what this process's code reads from now on
    page = sign_in(create_app(fresh), fresh).get("/model")
    assert page.status_code == 200 and "could not be fetched" in page.text and "travels inside" not in page.text


def test_concurrent_first_starts_put_one_version_in_production(stack: Any, tmp_path: Path) -> None:
    """Two processes start at once with different configured bundles and no model in production: exactly one
    version is registered and promoted and both use it; a later start with the other bundle changes nothing."""
    from skinscan.db import session_scope
    from skinscan.model.registry import ensure_production_model
    from skinscan.tables import AuditEvent, ModelVersion

    versions = [f"first-start-{i}-{uuid.uuid4().hex[:4]}" for i in range(2)]
    bundles = [tiny_bundle(tmp_path / f"bundle-{i}", v, seed=i) for i, v in enumerate(versions)]
    settings = [settings_with({**machine(stack, tmp_path, f"start-{i}"), "SKINSCAN_MODEL": str(b)})
                for i, b in enumerate(bundles)]
    barrier = threading.Barrier(2)
    chosen: list[str] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            barrier.wait(10)
            with session_scope(settings[i]) as session:
                row = ensure_production_model(session, settings[i])
                chosen.append(row.version)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    assert len(chosen) == 2 and chosen[0] == chosen[1]
    with session_scope(settings[0]) as session:
        rows = list(session.scalars(select(ModelVersion)))
        assert [(r.version, r.status) for r in rows] == [(chosen[0], "production")]
        assert rows[0].storage_prefix and rows[0].bundle_checksum
        promotions = session.scalar(select(func.count()).select_from(AuditEvent)
                                    .where(AuditEvent.action == "model.promote"))
        assert promotions == 1
    # The process configured with the other bundle starts again later: it uses the registered version.
    loser = 1 - versions.index(chosen[0])
    with session_scope(settings[loser]) as session:
        assert ensure_production_model(session, settings[loser]).version == chosen[0]
    with session_scope(settings[0]) as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1


def _stored_images_scored_by_an_old_model(settings: Any, n: int) -> None:
    """Rows of n stored images with predictions of model 'old'; model 'new' in production (no worker needed)."""
    from skinscan.db import session_scope
    from skinscan.tables import Clinic, ImageRecord, Job, ModelVersion, Prediction, utcnow

    with session_scope(settings) as session:
        for version, status in (("old", "retired"), ("new", "production")):
            session.add(ModelVersion(version=version, architecture="resnet18", path="/nowhere", checksum="0" * 64,
                                     meta={}, status=status, promoted_at=utcnow()))
        clinic = Clinic(name=f"clinic-{uuid.uuid4().hex[:6]}")
        session.add(clinic)
        session.flush()
        job = Job(clinic_id=clinic.id, status="done", model_version="old", total=n, scored=n)
        session.add(job)
        session.flush()
        for i in range(n):
            image = ImageRecord(job_id=job.id, clinic_id=clinic.id, position=i, filename=f"{i}.jpg",
                                storage_key=f"{clinic.id}/{job.id}/{i}.jpg", status="scored")
            session.add(image)
            session.flush()
            session.add(Prediction(image_id=image.id, model_version="old", probabilities={"nv": 1.0}, label="nv",
                                   confidence=1.0, malignancy=0.0, flagged=False))


def _queued_messages(redis_url: str, queue: str) -> int:
    """Messages waiting in a Celery queue on Redis (every priority sub-queue)."""
    client = redis.Redis.from_url(redis_url)
    return sum(client.llen(k) for k in client.keys(f"{queue}*") if client.type(k) == b"list")


def test_two_nightly_tasks_of_one_night_start_one_run(stack: Any, monkeypatch: pytest.MonkeyPatch,
                                                      fresh_settings: Callable[[], Any]) -> None:
    """Two beats send the nightly task; both run at once on PostgreSQL: one claims the night and starts the run,
    the other finds the claim and does nothing (no second run, no second set of chunks); a retry of the winner
    goes on; the next night is claimed afresh."""
    from datetime import UTC, datetime, timedelta

    from skinscan.db import session_scope
    from skinscan.tables import NightlyClaim, RescoreRun
    from worker.nightly import run_nightly

    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    settings = fresh_settings()
    _stored_images_scored_by_an_old_model(settings, 40)
    night = datetime(2026, 11, 27, 2, 0, 5, tzinfo=UTC)
    barrier = threading.Barrier(2)
    results: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def beat_task(task_id: str) -> None:
        try:
            barrier.wait(10)
            results[task_id] = run_nightly(settings, task_id, now=night)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=beat_task, args=(f"beat-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    winners = [t for t, run in results.items() if run is not None]
    assert len(results) == 2 and len(winners) == 1, results
    with session_scope(settings) as session:
        runs = list(session.scalars(select(RescoreRun)))
        assert [(r.id, r.total, r.actor) for r in runs] == [(results[winners[0]], 40, "schedule")]
        claims = [(c.key, c.task_id, c.run_id) for c in session.scalars(select(NightlyClaim))]
        assert claims == [("2026-11-27", winners[0], runs[0].id)]
    chunks = -(-40 // settings.chunk_size)
    assert _queued_messages(stack.redis_url, "rescore") == chunks  # one set of chunks, not two

    # Later the same night (a third beat, a task that waited in the queue past midnight): nothing.
    assert run_nightly(settings, "beat-late", now=night + timedelta(hours=23)) is None
    # The winner's retry (same task id) goes on: the run is resumed, not duplicated, and not re-sent.
    assert run_nightly(settings, winners[0], now=night) == runs[0].id
    assert _queued_messages(stack.redis_url, "rescore") == chunks
    # The next night is claimed afresh (the run still in progress is resumed, not duplicated).
    assert run_nightly(settings, "beat-next-night", now=night + timedelta(days=1)) == runs[0].id
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(RescoreRun)) == 1
        assert session.scalar(select(func.count()).select_from(NightlyClaim)) == 2
