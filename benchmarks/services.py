"""Real services for sections 3, 4 and 6: moto's S3 server, a fresh PostgreSQL database, a Redis database,
`skinscan worker` and `skinscan web` (gunicorn) processes, and a client that uploads as `skinscan submit` does."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import ROOT, BenchmarkError, postgres_backends, tree_pids

log = logging.getLogger("benchmarks.services")

REDIS_BASE = os.environ.get("SKINSCAN_BENCH_REDIS", "redis://127.0.0.1:6379")


class Proc:
    """A service process in its own session (so stop() ends its children too), its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        """The process id of the service's main process."""
        return self.popen.pid

    def pids(self) -> list[int]:
        """The main process and all its children."""
        return tree_pids(self.pid) if self.popen.poll() is None else []

    def log_text(self) -> str:
        """The service's output so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        """Wait until the log contains needle; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if self.popen.poll() is not None:
                raise BenchmarkError(f"{self.log_path.name} exited early:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{self.log_path.name}: no {needle!r} after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


def wait_http(url: str, timeout: float, proc: Proc | None = None) -> None:
    """Wait until url answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc is not None and proc.popen.poll() is not None:
            raise BenchmarkError(f"{proc.log_path.name} exited early:\n{proc.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{url} not answering 200 after {timeout:.0f}s")
        time.sleep(0.3)


class KeepAliveS3:
    """moto's S3 (in memory) under gunicorn: one process, threads, keep-alive connections like S3 and MinIO."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
                "--worker-class", "gthread", "--threads", "16", "--keep-alive", "75", "--log-level", "warning",
                "benchmarks.s3_app:app"]
        self.proc = Proc(argv, dict(os.environ), workdir / "s3-server.log")
        wait_http(f"{self.url}/", timeout=120, proc=self.proc)  # moto answers the bucket listing

    def pids(self) -> list[int]:
        """The server's processes (gunicorn's arbiter and its worker)."""
        return self.proc.pids()

    def close(self) -> None:
        """Stop the server."""
        self.proc.stop()


def free_port() -> int:
    """A free loopback TCP port."""
    from realservices import free_port as _free_port

    return _free_port()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set os.environ to env for the block, then restore it (settings are read again inside and after it)."""
    from skinscan.settings import load_settings

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    load_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        load_settings.cache_clear()


class Deployment:
    """One isolated SkinScan deployment: a fresh database, bucket and Redis database, a clinic and its key."""

    def __init__(self, workdir: Path, bundle: Path, s3_url: str, redis_db: int, extra: dict[str, str]) -> None:
        from realservices import PostgresDatabase

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.db = PostgresDatabase()
        self.db_name = self.db.name
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.env = dict(os.environ)
        for name in ("SKINSCAN_ENV", "SKINSCAN_THREADS", "SKINSCAN_BATCH_SIZE", "SKINSCAN_DECODE_WORKERS",
                     "SKINSCAN_CHUNK_SIZE", "SKINSCAN_BACKEND", "OMP_NUM_THREADS"):
            self.env.pop(name, None)
        self.env.update({
            "DATABASE_URL": self.db.url, "REDIS_URL": f"{REDIS_BASE}/{redis_db}", "S3_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "SKINSCAN_DATA_DIR": str(workdir / "data"),
            "SKINSCAN_MODEL": str(bundle), "SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "SKINSCAN_RESCORE_ENABLED": "false",
            "SKINSCAN_MAX_FILES": "100000", "SKINSCAN_RATE_LIMIT_PER_MINUTE": "1000000",
            **extra,
        })
        self.settings = self._settings()
        from skinscan.migrate import upgrade
        from skinscan.storage import S3Storage

        with environment(self.env):
            S3Storage(self.bucket, s3_url).ensure_bucket()
            upgrade(self.settings)
        self.clinic_id, self.key = self._clinic()
        self.procs: list[Proc] = []
        self._pg_pids: list[int] = []
        self._pg_scanned = 0.0

    def _settings(self) -> Any:
        from skinscan.settings import load_settings

        with environment(self.env):
            return load_settings()

    def _clinic(self) -> tuple[str, str]:
        from skinscan.db import session_scope
        from skinscan.security import create_api_key
        from skinscan.tables import Clinic

        with session_scope(self.settings) as session:
            clinic = Clinic(name=f"bench-{uuid.uuid4().hex[:6]}")
            session.add(clinic)
            session.flush()
            return clinic.id, create_api_key(session, clinic)

    def start_worker(self, name: str = "worker") -> Proc:
        """Start `skinscan worker` with its CPU defaults; return once Celery says it is ready."""
        proc = Proc([sys.executable, "-m", "skinscan.cli", "worker", "--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h"],
                    self.env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        proc.wait_for_log(" ready.", timeout=300)
        return proc

    def start_web(self, name: str = "web") -> tuple[Proc, str]:
        """Start `skinscan web` (gunicorn, its default workers and threads) on a free port; return it and its URL."""
        port = free_port()
        proc = Proc([sys.executable, "-m", "skinscan.cli", "web", "--host", "127.0.0.1", "--port", str(port)],
                    self.env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", timeout=300, proc=proc)
        return proc, url

    def postgres_pids(self) -> list[int]:
        """PostgreSQL backends serving this deployment's database (the /proc scan is redone once a second)."""
        now = time.monotonic()
        if now - self._pg_scanned > 1.0:
            self._pg_pids, self._pg_scanned = postgres_backends(self.db_name), now
        return self._pg_pids

    def stop_processes(self) -> None:
        """Stop the worker and web processes started here."""
        for proc in self.procs:
            proc.stop()
        self.procs.clear()

    def close(self) -> None:
        """Stop processes and drop the database."""
        self.stop_processes()
        from skinscan.db import engine_for_url

        engine_for_url(self.settings.database_url).dispose()
        self.db.close()

    def store_job(self, images: list[tuple[str, bytes]]) -> str:
        """Store images and commit a queued job for them in this process, without enqueueing it; return its id."""
        from skinscan.db import session_scope
        from skinscan.jobs.intake import create_job
        from skinscan.storage import S3Storage
        from skinscan.tables import Clinic

        storage = S3Storage(self.settings.s3_bucket, self.settings.s3_endpoint_url)
        with environment(self.env), session_scope(self.settings) as session:
            clinic = session.get(Clinic, self.clinic_id)
            files = [(name, io.BytesIO(data)) for name, data in images]
            result = create_job(session, storage, clinic, files, None, self.settings, "benchmark", finalize=True)
            return result.job.id

    def connect_broker(self) -> None:
        """Open this process's broker connection ahead of a timed enqueue."""
        from skinscan.broker import celery_for

        with celery_for(self.settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)

    def enqueue(self, job_id: str) -> int:
        """Send a committed job's chunks to the workers; return the number of chunks."""
        from skinscan.db import session_scope
        from skinscan.jobs.dispatch import enqueue_job

        with session_scope(self.settings) as session:
            return enqueue_job(session, job_id, self.settings)

    def job_state(self, job_id: str) -> dict[str, Any]:
        """Status, counts and timestamps (epoch seconds) of a job, first and last prediction included."""
        from sqlalchemy import func, select

        from skinscan.db import session_scope
        from skinscan.tables import ImageRecord, Job, Prediction

        with session_scope(self.settings) as session:
            job = session.get(Job, job_id)
            first, last = session.execute(
                select(func.min(Prediction.created_at), func.max(Prediction.created_at))
                .join(ImageRecord, ImageRecord.id == Prediction.image_id).where(ImageRecord.job_id == job_id)).one()
            return {"status": job.status, "total": job.total, "scored": job.scored, "failed": job.failed,
                    "finished_at": _epoch(job.finished_at), "first_prediction_at": _epoch(first),
                    "last_prediction_at": _epoch(last)}

    def wait_job(self, job_id: str, timeout: float, interval: float = 0.5) -> dict[str, Any]:
        """Wait (reading the database) until the job is done or failed; return its state (its times come from
        the database, so the polling interval does not change them)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state["status"] in ("done", "failed"):
                return state
            if time.monotonic() > deadline:
                raise BenchmarkError(f"job {job_id} still {state['status']} after {timeout:.0f}s: {state}")
            time.sleep(interval)


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class Client:
    """The API as `skinscan submit` uses it: a job uploaded in parts of files, then started."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"
        self.first_part_at: float | None = None  # when the first part's answer came (its images were committed)

    def _check(self, resp: requests.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            raise BenchmarkError(f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text[:500]}")
        return resp.json()

    def upload(self, images: list[tuple[str, bytes]], part_files: int) -> str:
        """Upload images as one job in parts of part_files (finalize=false), then start it; return its id."""
        parts = [images[i : i + part_files] for i in range(0, len(images), part_files)]
        job_id = ""
        for n, part in enumerate(parts):
            files = [("files", (name, data, "image/jpeg")) for name, data in part]
            if n == 0:
                job_id = self._check(self.session.post(f"{self.url}/api/v1/jobs", files=files,
                                                       data={"finalize": "false"}, timeout=600))["id"]
                self.first_part_at = time.time()
            else:
                self._check(self.session.post(f"{self.url}/api/v1/jobs/{job_id}/images", files=files, timeout=600))
        self._check(self.session.post(f"{self.url}/api/v1/jobs/{job_id}/start", timeout=120))
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        """GET the job's status."""
        return self._check(self.session.get(f"{self.url}/api/v1/jobs/{job_id}", timeout=60))
