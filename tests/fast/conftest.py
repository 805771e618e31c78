"""The fast layer: Flask-tutorial-style `app` and `client` fixtures on the embedded defaults, no services.

Each test gets its own SKINSCAN_DATA_DIR under tmp_path: a SQLite file (a copy of one migrated at session start,
so the schema is the migrations' own) and a local images folder; no REDIS_URL, no S3_BUCKET, no DATABASE_URL.
A registered production model row stands in for a bundle, and Celery's send_task is recorded instead of sent, so
nothing here loads a network or needs a broker.
"""

from __future__ import annotations

import io
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastweb import MODEL_VERSION, SentTasks, make_clinic
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage
from realservices import Api

SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "SKINSCAN_ENV", "SKINSCAN_MODEL")


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the latest revision once per session (copied for each test)."""
    from skinscan.db import engine_for_url
    from skinscan.migrate import upgrade
    from skinscan.settings import load_settings

    folder = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        for name in SERVICE_VARIABLES:
            mp.delenv(name, raising=False)
        mp.setenv("SKINSCAN_DATA_DIR", str(folder))
        settings = load_settings()
        upgrade(settings)
        engine_for_url(settings.database_url).dispose()
    return folder / "skinscan.db"


@pytest.fixture()
def settings(tmp_path: Path, migrated_template: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Embedded settings on tmp_path (SQLite + local images folder) with a production model registered."""
    from skinscan.db import engine_for_url, session_scope
    from skinscan.settings import load_settings
    from skinscan.tables import ModelVersion, utcnow

    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("SKINSCAN_DATA_DIR", str(data))
    monkeypatch.setenv("SECRET_KEY", "fast-" + secrets.token_hex(16))
    monkeypatch.setenv("SKINSCAN_CHUNK_SIZE", "2")
    with sqlite3.connect(migrated_template) as src, sqlite3.connect(data / "skinscan.db") as dst:
        src.backup(dst)
    s = load_settings()
    assert s.embedded and s.s3_bucket is None and s.database_url.startswith("sqlite:///")
    with session_scope(s) as session:
        session.add(ModelVersion(version=MODEL_VERSION, architecture="regnet_y_400mf", path=str(tmp_path),
                                 checksum="0" * 64, meta={"classes": []}, status="production",
                                 promoted_at=utcnow()))
    yield s
    engine_for_url(s.database_url).dispose()


@pytest.fixture()
def app(settings: Any) -> Flask:
    """The web app on the embedded settings, as `skinscan serve` builds it."""
    from web import create_app

    app = create_app(settings, {"TESTING": True})
    return app


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> SentTasks:
    """Record every Celery task sent (enqueue_job, Grad-CAM requests) instead of sending it."""
    import skinscan.broker

    recorder = SentTasks()
    monkeypatch.setattr(skinscan.broker, "celery_for", lambda _settings: recorder)
    return recorder


@pytest.fixture()
def new_api(client: FlaskClient, settings: Any) -> Callable[[], Api]:
    """Factory: an API client signed in as a fresh clinic (call twice for two clinics)."""

    def make() -> Api:
        clinic_id, key = make_clinic(settings)
        return Api(client, key, clinic_id)

    return make


@pytest.fixture()
def api(new_api: Callable[[], Api]) -> Api:
    """The API as one fresh clinic."""
    return new_api()


@pytest.fixture(scope="session")
def jpeg() -> Callable[..., bytes]:
    """Factory: a small real JPEG of random pixels (differs by seed)."""

    def make(seed: int = 0, side: int = 48) -> bytes:
        rng = np.random.default_rng(seed)
        out = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    return make
