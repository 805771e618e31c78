"""Services a test owns alone, so it may restart them: a Redis server, a PostgreSQL cluster, beat and web processes.

The machine's shared PostgreSQL and Redis are never stopped or flushed by these tests; a test that restarts a
service starts its own copy on a free port and points the stack's environment at it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realservices import ROOT, Api, ProcessGroup, free_port, wait_port

log = logging.getLogger(__name__)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class RedisServer:
    """A private redis-server without persistence: a restart loses every queued and unacked message."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_port("127.0.0.1", self.port, 20)

    def stop(self) -> None:
        """Kill the server (its data is gone)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        """Kill the server, wait, and start an empty one on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def flush(self) -> None:
        """Empty every database of this server."""
        import redis

        redis.Redis.from_url(self.url).flushall()


class PostgresCluster:
    """A private PostgreSQL 15 cluster (initdb into a temporary folder, run as the postgres user)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="skinscan-pg-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                           "--no-sync", "-E", "UTF8"])
        self.start()
        self._as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                           "skinscan"])

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's skinscan database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/skinscan"

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, cwd=self.root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                           "-o", f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off",
                           "-w", "-t", "60", *extra, action])

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("start")
        wait_port("127.0.0.1", self.port, 60)

    def stop(self) -> None:
        """Stop the server, ending every session at once (-m fast)."""
        self._pg_ctl("stop", "-m", "fast")

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server, wait, start it again."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop the server if it runs and remove the cluster."""
        try:
            self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class ServiceProcess(ProcessGroup):
    """A `skinscan <command>` process (beat, web) in its own process group, with its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env, self.log_path, self.args = env, log_path, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start the process."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "skinscan.cli", *self.args], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        return self


def rewire(stack: Any, redis_url: str | None = None, database_url: str | None = None) -> None:
    """Point a stack (and the processes it starts from now on) at private services; migrate a new database."""
    if redis_url:
        stack.env["REDIS_URL"] = redis_url
        stack.redis_url = redis_url
    if database_url:
        stack.env["DATABASE_URL"] = database_url
        from skinscan.migrate import upgrade

        upgrade(stack.settings())


@dataclass
class Client(Api):
    """A Flask test client of one stack, signed in as a fresh clinic; polls that ride out service outages."""

    settings: Any

    def wait(self, job_id: str, timeout: float = 300, until: tuple[str, ...] = ("done", "failed")) -> dict[str, Any]:
        """Poll the job until it reaches one of the statuses; answers other than 200 (an outage) are retried."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while True:
            try:
                resp = self.get(f"/api/v1/jobs/{job_id}")
                if resp.status_code == 200:
                    body = resp.get_json()
                    if body["status"] in until:
                        return body
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                log.info("status poll failed: %s", exc)
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {until} after {timeout}s: {body}")
            time.sleep(0.5)


def make_client(settings: Any, name: str | None = None) -> Client:
    """Create an app on these settings and a clinic with an API key."""
    from skinscan.db import session_scope
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic
    from web import create_app

    with session_scope(settings) as session:
        clinic = Clinic(name=name or f"clinic-{uuid.uuid4().hex[:8]}")
        session.add(clinic)
        session.flush()
        key = create_api_key(session, clinic)
        clinic_id = clinic.id
    return Client(create_app(settings).test_client(), key, clinic_id, settings)


def settings_with(stack: Any, **env: str) -> Any:
    """Settings as a process of this stack would read them with extra environment variables."""
    from skinscan.settings import read_settings

    saved = dict(os.environ)
    os.environ.update({**stack.env, **env})
    try:
        return read_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
