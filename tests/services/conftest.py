"""Fixtures for tests on real services: PostgreSQL, Redis, an S3 server over HTTP and Celery worker processes."""

from __future__ import annotations

import contextlib
import csv
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from realservices import (
    REDIS_BASE,
    Api,
    MotoS3,
    PostgresDatabase,
    TcpProxy,
    WorkerProcess,
    missing_service,
    postgres_available,
)

ISIC_TEST = "ISIC-2017_Test_v2_Data"
ISIC_TRUTH = "ISIC-2017_Test_v2_Part3_GroundTruth.csv"


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model bundle the services load: the shipped default, or a tiny untrained one if none ships yet."""
    from skinscan.bundles import DEFAULT_BUNDLE_DIR as default

    if (default / "metadata.json").is_file():
        return default
    from training.export import create_model, save_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    model = create_model("mobilenet_v3_small", 7)
    save_bundle(model, out, {"architecture": "mobilenet_v3_small", "version": "tiny-untrained", "input_size": 64,
                             "resize_size": 73, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                             "temperature": 1.0})
    return out


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoS3]:
    """moto's S3 server for the whole test session."""
    server = MotoS3()
    yield server
    server.close()


@dataclass
class Stack:
    """Environment and handles of one isolated SkinScan deployment on the real services."""

    env: dict[str, str]
    tmp: Path
    db: PostgresDatabase
    s3_proxy: TcpProxy
    redis_url: str
    workers: list[WorkerProcess] = field(default_factory=list)

    def settings(self) -> Any:
        """Settings as the processes of this stack read them."""
        from skinscan.settings import read_settings

        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            return read_settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def worker(self, concurrency: int = 1, queues: str = "skinscan,rescore") -> WorkerProcess:
        """Start a worker process for this stack."""
        w = WorkerProcess(self.env, self.tmp / f"worker{len(self.workers)}.log", concurrency,
                          f"w{len(self.workers)}", queues).start()
        self.workers.append(w)
        return w


@contextlib.contextmanager
def open_stack(tmp_path: Path, moto: MotoS3, service_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A fresh database, Redis database and bucket, with settings pointing at them (workers started on demand)."""
    if not postgres_available():
        missing_service("PostgreSQL is not reachable at 127.0.0.1:5432 (CI starts it; see README)")
    try:
        claims = redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=2)
        claims.ping()
    except redis.RedisError:
        missing_service("Redis is not reachable at 127.0.0.1:6379 (CI starts it; see README)")
    # A Redis database of its own, so test runs side by side never take each other's tasks.
    claim = next((f"skinscan-test:redis-db:{n}" for n in range(1, 10)
                  if claims.set(f"skinscan-test:redis-db:{n}", str(os.getpid()), nx=True, ex=3600)), None)
    if claim is None:
        pytest.fail("Redis databases 1..9 are all claimed by other test runs")
    redis_url = f"{REDIS_BASE}/{claim.rsplit(':', 1)[1]}"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    db = PostgresDatabase()
    proxy = TcpProxy(moto.port)
    bucket = f"skinscan-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": db.url, "REDIS_URL": redis_url, "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "SKINSCAN_DATA_DIR": str(tmp_path / "data"), "SKINSCAN_MODEL": str(service_bundle),
        "SKINSCAN_VISIBILITY_TIMEOUT": "20", "SKINSCAN_REQUEUE_AFTER_SECONDS": "15",
        "SKINSCAN_CHUNK_SIZE": "16", "SECRET_KEY": "test-secret-" + uuid.uuid4().hex,
    })
    env.pop("SKINSCAN_ENV", None)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])  # boto3 in this process reads them from the environment
    st = Stack(env=env, tmp=tmp_path, db=db, s3_proxy=proxy, redis_url=redis_url)
    settings = st.settings()
    from skinscan.migrate import upgrade
    from skinscan.storage import S3Storage

    S3Storage(bucket, moto.url).ensure_bucket()
    upgrade(settings)
    try:
        yield st
    finally:
        for w in st.workers:
            w.stop()
        from skinscan.db import dispose_engines

        dispose_engines()
        proxy.close()
        db.close()
        client.flushdb()
        claims.delete(claim)


@pytest.fixture()
def stack(tmp_path: Path, moto: MotoS3, service_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A stack of this test's own (open_stack)."""
    with open_stack(tmp_path, moto, service_bundle, monkeypatch) as st:
        yield st


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory, moto: MotoS3, service_bundle: Path) -> Iterator[Stack]:
    """A stack shared by the tests of one module: for one costly job (a worker scoring it) that several read."""
    with pytest.MonkeyPatch.context() as monkeypatch, \
            open_stack(tmp_path_factory.mktemp("stack"), moto, service_bundle, monkeypatch) as st:
        yield st


def make_clinic(settings: Any, name: str) -> tuple[str, str]:
    """Create a clinic with an API key; return (clinic id, key)."""
    from skinscan.db import session_scope
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic

    with session_scope(settings) as session:
        clinic = Clinic(name=name)
        session.add(clinic)
        session.flush()
        key = create_api_key(session, clinic)
        return clinic.id, key


@pytest.fixture()
def api(stack: Stack) -> Api:
    """A test client on the stack's settings, signed in as a fresh clinic."""
    from web import create_app

    settings = stack.settings()
    app = create_app(settings)
    clinic_id, key = make_clinic(settings, f"clinic-{uuid.uuid4().hex[:6]}")
    return Api(app.test_client(), key, clinic_id)


@pytest.fixture(scope="session")
def isic_test_images(isic2017_dir: Path) -> Callable[[int], tuple[list[tuple[str, bytes]], bytes]]:
    """Factory: the first n ISIC 2017 test images as (name, bytes) and their ground-truth CSV cut to them."""

    def take(n: int) -> tuple[list[tuple[str, bytes]], bytes]:
        folder = isic2017_dir / ISIC_TEST
        paths = sorted(folder.glob("ISIC_*.jpg"))[:n]
        ids = {p.stem for p in paths}
        with (isic2017_dir / ISIC_TRUTH).open(newline="") as fh:
            rows = list(csv.reader(fh))
        text = "\n".join(",".join(r) for r in [rows[0]] + [r for r in rows[1:] if r[0] in ids]) + "\n"
        return [(p.name, p.read_bytes()) for p in paths], text.encode()

    return take
