"""Least privilege on PostgreSQL: the schema's owner runs migrations, web, worker and beat run as a runtime role.

`skinscan migrate` (as the owner, with SKINSCAN_DB_RUNTIME_ROLE set) grants the runtime role what the processes
need and nothing more: SELECT, INSERT, UPDATE and DELETE on the tables, but only SELECT and INSERT on
`audit_events` and SELECT on `alembic_version`, and the sequences. It owns no table, so it cannot
`ALTER TABLE audit_events DISABLE TRIGGER`, and as no superuser it cannot `SET session_replication_role`: the
append-only triggers hold against the application's own credentials. The grants are redone at every migrate, so a
table a new migration adds is covered.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from skinscan.settings import ConfigError, Settings

log = logging.getLogger(__name__)

APPEND_ONLY = "audit_events"
READ_ONLY = "alembic_version"


def _quote(connection: Connection, name: str) -> str:
    return connection.dialect.identifier_preparer.quote_identifier(name)


def runtime_role_problems(connection: Connection, role: str | None = None) -> list[str]:
    """Why a role (default: the connected one) could switch the audit triggers off; [] when it cannot."""
    if connection.dialect.name != "postgresql":
        return []
    found = connection.execute(text("SELECT rolname, rolsuper FROM pg_roles "
                                    "WHERE rolname = coalesce(:r, current_user)"), {"r": role}).first()
    if found is None:
        return [f"role {role!r} does not exist (create it first: see the README's production section)"]
    problems = []
    if found.rolsuper:
        problems.append(f"role {found.rolname} is a superuser (it can SET session_replication_role = replica)")
    owns = connection.execute(text("SELECT pg_has_role(:r, relowner, 'MEMBER') FROM pg_class "
                                   "WHERE oid = to_regclass(:t)"), {"r": found.rolname, "t": APPEND_ONLY}).scalar()
    if owns:
        problems.append(f"role {found.rolname} owns {APPEND_ONLY} or is a member of its owner "
                        "(it can ALTER TABLE ... DISABLE TRIGGER)")
    return problems


def grant_runtime_role(settings: Settings) -> None:
    """Give SKINSCAN_DB_RUNTIME_ROLE the runtime grants (PostgreSQL; run as the schema's owner after migrating).

    Raises ConfigError, granting nothing, if that role could disable the audit triggers (superuser, owner)."""
    from skinscan.db import engine_for_url

    role = settings.db_runtime_role
    if not role:
        return
    engine = engine_for_url(settings.database_url)
    with engine.begin() as connection:
        if connection.dialect.name != "postgresql":
            log.warning("SKINSCAN_DB_RUNTIME_ROLE is set but the database is not PostgreSQL: nothing granted")
            return
        problems = runtime_role_problems(connection, role)
        if problems:
            raise ConfigError("SKINSCAN_DB_RUNTIME_ROLE: " + "; ".join(problems))
        who = _quote(connection, role)
        for statement in (
            f"GRANT USAGE ON SCHEMA public TO {who}",
            f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {who}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {who}",
            f"REVOKE UPDATE, DELETE ON {APPEND_ONLY} FROM {who}",
            f"REVOKE INSERT, UPDATE, DELETE ON {READ_ONLY} FROM {who}",
            f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {who}",
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {who}",
        ):
            connection.execute(text(statement))
    log.info("database role %s granted the runtime privileges (audit_events: SELECT and INSERT only)", role)


def warn_if_privileged(settings: Settings) -> None:
    """Log a warning when a production process connects as a role that could switch the audit triggers off."""
    from skinscan.db import engine_for_url

    if not settings.database_url.startswith("postgresql"):
        return
    try:
        with engine_for_url(settings.database_url).connect() as connection:
            problems = runtime_role_problems(connection)
    except SQLAlchemyError as exc:  # the database is not up yet: the process's own checks report it
        log.debug("database role not checked: %s", exc)
        return
    if problems:
        log.warning("the database role of this process is not least-privilege: %s; run web, worker and beat as "
                    "SKINSCAN_DB_RUNTIME_ROLE (README, production)", "; ".join(problems))
