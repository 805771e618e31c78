"""Least privilege on PostgreSQL: migrations as the owner, web and worker as SKINSCAN_DB_RUNTIME_ROLE, which runs the
whole service but cannot switch the audit triggers off or change an audit row."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from realservices import PG_ADMIN, ROOT, Api
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from tests_helpers import replace

from skinscan.audit import record
from skinscan.settings import ConfigError

pytestmark = [pytest.mark.services]

# What the runtime role must not be able to do to the audit trail (each succeeds for a superuser or the owner).
FORBIDDEN = [
    "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",
    "SET session_replication_role = replica",
    "DELETE FROM audit_events",
    "UPDATE audit_events SET actor = 'nobody'",
    "TRUNCATE audit_events",
    "DROP TRIGGER audit_events_no_update_delete ON audit_events",
    "CREATE TABLE sneaky (id int)",
]


def _admin(database: str, *statements: str) -> None:
    with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + database, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture()
def runtime_role(stack) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh login role (no privileges of its own), removed with everything granted to it afterwards."""
    role = f"skinscan_rt_{uuid.uuid4().hex[:8]}"
    _admin(stack.db.name, f'CREATE ROLE "{role}" LOGIN',
           'REVOKE CREATE ON SCHEMA public FROM PUBLIC')  # PostgreSQL < 15 lets every role create tables there
    yield role
    for worker in stack.workers:
        worker.stop()
    stack.workers.clear()
    from skinscan.db import dispose_engines

    dispose_engines()
    _admin(stack.db.name, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
           f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


def _as(url: str, role: str) -> str:
    return make_url(url).set(username=role).render_as_string(hide_password=False)


def test_runtime_role_cannot_touch_the_audit_trail(stack, runtime_role: str) -> None:  # type: ignore[no-untyped-def]
    """`skinscan migrate` with SKINSCAN_DB_RUNTIME_ROLE grants the role its privileges; the role records and reads
    audit events, but every way of disabling the triggers or removing a row is refused."""
    done = subprocess.run([sys.executable, "-m", "skinscan.cli", "migrate"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**stack.env, "SKINSCAN_DB_RUNTIME_ROLE": runtime_role})
    assert done.returncode == 0, done.stderr
    engine = create_engine(_as(stack.db.url, runtime_role))
    try:
        from sqlalchemy.orm import Session

        with Session(engine) as session, session.begin():
            record(session, "job.create", "api-key:role-test", target_type="job", target_id="j-1")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM audit_events")).scalar() == 1
            assert connection.execute(text("SELECT current_user")).scalar() == runtime_role
        for statement in FORBIDDEN:
            with engine.connect() as connection, pytest.raises(DBAPIError) as refused:
                connection.execute(text(statement))
            message = str(refused.value.orig)  # refused by the grants themselves, not only by the triggers
            assert "permission denied" in message or "must be owner" in message, (statement, message)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM audit_events")).scalar() == 1
            assert connection.execute(text("SELECT tgenabled FROM pg_trigger "
                                            "WHERE tgname = 'audit_events_no_update_delete'")).scalar() == "O"
    finally:
        engine.dispose()


def test_the_service_runs_as_the_runtime_role(stack, runtime_role: str, isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Upload, scoring by a worker, results, cancel and delete all work with only the runtime grants."""
    from conftest import make_clinic

    from skinscan.db_roles import grant_runtime_role
    from web import create_app

    grant_runtime_role(replace(stack.settings(), db_runtime_role=runtime_role))
    stack.env["DATABASE_URL"] = _as(stack.db.url, runtime_role)
    settings = stack.settings()
    stack.worker()
    clinic_id, key = make_clinic(settings, "runtime-role")
    api = Api(create_app(settings).test_client(), key, clinic_id)
    files, _labels = isic_test_images(3)
    response = api.submit(files)
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    assert api.wait(job_id)["counts"]["scored"] == 3
    assert api.get(f"/api/v1/jobs/{job_id}/results?format=csv").status_code == 200
    assert api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers()).status_code == 200


def test_migrate_refuses_a_privileged_runtime_role(stack) -> None:  # type: ignore[no-untyped-def]
    """Naming a superuser (or the owner) as the runtime role is refused, naming why."""
    from skinscan.db_roles import grant_runtime_role

    owner = make_url(stack.db.url).username
    with pytest.raises(ConfigError, match="superuser|owns audit_events"):
        grant_runtime_role(replace(stack.settings(), db_runtime_role=owner))
    with pytest.raises(ConfigError, match="does not exist"):
        grant_runtime_role(replace(stack.settings(), db_runtime_role="no_such_role_" + uuid.uuid4().hex[:6]))


