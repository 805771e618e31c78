"""Real services for tests: a fresh PostgreSQL database, a Redis database, an S3 server over HTTP, workers.

PostgreSQL and Redis are the machine's own (127.0.0.1:5432 and :6379, as CI provides them); the S3 server is
moto's standalone server, started here on a free port unless SKINSCAN_TEST_S3_ENDPOINT names one.
"""

from __future__ import annotations

import io
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest

PG_ADMIN = os.environ.get("SKINSCAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("SKINSCAN_TEST_REDIS", "redis://127.0.0.1:6379")
ROOT = Path(__file__).resolve().parents[2]


def missing_service(reason: str) -> NoReturn:
    """Skip the test for a service that is not there, or fail it under CI=true, where every service must be."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so a missing service fails the run instead of skipping", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def postgres_available() -> bool:
    """True when the test PostgreSQL server answers."""
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


class PostgresDatabase:
    """A fresh, uniquely named database on the test server, dropped on close."""

    def __init__(self) -> None:
        self.name = f"skinscan_t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base = PG_ADMIN.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}".replace("postgresql://", "postgresql+psycopg://", 1)

    def close(self) -> None:
        """Drop the database, ending any connection left to it."""
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                         (self.name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}"')


class MotoS3:
    """moto's S3 server as a subprocess on a free loopback port (in memory; checks no credentials)."""

    def __init__(self) -> None:
        external = os.environ.get("SKINSCAN_TEST_S3_ENDPOINT")
        if external:  # a server .ci/run started; buckets are unique per test, so it can be shared
            self.proc = None
            self.url = external.rstrip("/")
            self.port = int(self.url.rsplit(":", 1)[1])
            try:
                wait_port("127.0.0.1", self.port)
            except TimeoutError:
                missing_service(f"no S3 server at SKINSCAN_TEST_S3_ENDPOINT={external}")
            return
        self.port = free_port()
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not Path(exe).is_file():
            missing_service(f"moto's S3 server ({exe}) is not installed: pip install 'moto[server]'")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.port, timeout=120)
        except TimeoutError:
            self.close()
            missing_service(f"moto's S3 server did not start on port {self.port}")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop the server (if this process started it)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


class TcpProxy:
    """A loopback TCP proxy that can be cut (refusing and dropping connections) and restored, for outages."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        self._listener: socket.socket | None = None
        self._open_listener()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _open_listener(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s

    def _accept_loop(self) -> None:
        while not self._stop:
            if not self._up.is_set() or self._listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):  # ValueError: cut() closed a socket while select() waited on it
            return
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        """Refuse new connections and drop open ones."""
        self._up.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def restore(self) -> None:
        """Accept connections again."""
        self._open_listener()
        self._up.set()

    def close(self) -> None:
        """Stop the proxy."""
        self._stop = True
        self.cut()


class ProcessGroup:
    """A process started in its own process group (so kill() takes its children too), with its log in a file."""

    stop_timeout = 20.0
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """SIGKILL the process group."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM the process group (let it finish), then SIGKILL it if it lingers."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """The process's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class WorkerProcess(ProcessGroup):
    """`skinscan worker` in its own process, with its log in a file."""

    stop_timeout = 30.0

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 1, name: str = "w1",
                 queues: str = "skinscan,rescore") -> None:
        self.env, self.log_path, self.concurrency, self.name, self.queues = env, log_path, concurrency, name, queues
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker (in its own process group, so kill() takes its children too)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skinscan.cli", "worker", "--concurrency", str(self.concurrency),
             "--hostname", f"{self.name}-{uuid.uuid4().hex[:6]}@%h", "--queues", self.queues],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )
        return self


@dataclass
class Api:
    """A Flask test client for one stack, with a clinic and its API key."""

    client: Any
    key: str
    clinic_id: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        """Authorization header for this clinic (or another key)."""
        return {"Authorization": f"Bearer {key or self.key}"}

    def submit(self, files: list[tuple[str, bytes]], labels: bytes | None = None, **form: str) -> Any:
        """POST /api/v1/jobs with files (and labels)."""
        data: dict[str, Any] = {"files": [(io.BytesIO(b), name) for name, b in files], **form}
        if labels is not None:
            data["labels"] = (io.BytesIO(labels), "labels.csv")
        return self.client.post("/api/v1/jobs", data=data, headers=self.headers(),
                                content_type="multipart/form-data")

    def get(self, path: str, key: str | None = None) -> Any:
        """GET an API path as this clinic (or with another key)."""
        return self.client.get(path, headers=self.headers(key))

    def wait(self, job_id: str, timeout: float = 300, until: tuple[str, ...] = ("done", "failed")) -> dict[str, Any]:
        """Poll the job until it reaches one of the given statuses."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.client.get(f"/api/v1/jobs/{job_id}", headers=self.headers()).get_json()
            if body["status"] in until:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {body['status']} after {timeout}s: {body}")
            time.sleep(0.5)
