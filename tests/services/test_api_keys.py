"""Revoking and rotating API keys on PostgreSQL: the CLI, the clinic's Keys page, the audit trail, the key cache's
delay, and two revocations of one key at once."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from realservices import ROOT
from sqlalchemy import select
from test_web_pages import Staff, make_user
from tests_helpers import replace

from skinscan.api_keys import ApiKeyError, revoke_key
from skinscan.db import session_scope
from skinscan.security import create_api_key
from skinscan.tables import ApiKey, AuditEvent, Clinic

pytestmark = [pytest.mark.services]


def _cli(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skinscan.cli", "clinics", *args], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _add_key(settings: Any, clinic_id: str) -> str:
    with session_scope(settings) as session:
        return create_api_key(session, session.get(Clinic, clinic_id))


def _audit(settings: Any, clinic_id: str) -> list[tuple[str, str, str | None]]:
    with session_scope(settings) as session:
        return [tuple(r) for r in session.execute(
            select(AuditEvent.action, AuditEvent.actor, AuditEvent.target_id)
            .where(AuditEvent.clinic_id == clinic_id, AuditEvent.action.like("clinic.key_%"))
            .order_by(AuditEvent.id))]


def _status(client: Any, key: str) -> int:
    return int(client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code)


def test_cli_revoke_and_rotate_within_the_cache_time(stack) -> None:  # type: ignore[no-untyped-def]
    """`clinics revoke-key` stops a key on a web process that has it cached within SKINSCAN_API_KEY_CACHE_SECONDS;
    `rotate-key` prints a working new key and stops the old; both audited; a second revoke is refused."""
    from web import create_app

    settings = replace(stack.settings(), api_key_cache_seconds=3)
    clinic_id, _email = make_user(settings, "Keys Clinic")
    first, second = _add_key(settings, clinic_id), _add_key(settings, clinic_id)
    client = create_app(settings).test_client()
    assert _status(client, first) == 200 and _status(client, second) == 200  # both now cached

    done = _cli(stack, "revoke-key", "Keys Clinic", first[:12])
    revoked_at = time.monotonic()
    assert done.returncode == 0, done.stderr
    while _status(client, first) == 200:
        assert time.monotonic() - revoked_at < 3.5, "the revoked key still works after the cache time"
        time.sleep(0.1)
    assert time.monotonic() - revoked_at <= 3.5 and _status(client, second) == 200

    again = _cli(stack, "revoke-key", "Keys Clinic", first[:12])
    assert again.returncode != 0 and "already revoked" in again.stderr
    rotated = _cli(stack, "rotate-key", "Keys Clinic", second[:12])
    assert rotated.returncode == 0, rotated.stderr
    new = re.search(r"^API key: (sk_\S+)$", rotated.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert _status(client, new) == 200
    time.sleep(3.1)
    assert _status(client, second) == 401 and _status(client, first) == 401
    listing = _cli(stack, "keys", "Keys Clinic").stdout
    assert first[:12] in listing and new[:12] in listing and new not in listing
    actions = [(a, t) for a, actor, t in _audit(settings, clinic_id) if actor.startswith("cli")]
    assert actions == [("clinic.key_revoked", first[:12]), ("clinic.key_revoked", second[:12]),
                       ("clinic.key_created", new[:12])]


def test_keys_page_rotates_and_revokes_own_keys_only(stack) -> None:  # type: ignore[no-untyped-def]
    """A signed-in user replaces and revokes their clinic's keys on the Keys page (refused at once by this web
    process), sees the new key once, and cannot touch another clinic's key (404, still working)."""
    from web import create_app

    settings = stack.settings()
    app = create_app(settings)
    clinic_id, email = make_user(settings)
    other_id, _other_email = make_user(settings)
    old, other_key = _add_key(settings, clinic_id), _add_key(settings, other_id)
    api = app.test_client()
    assert _status(api, old) == 200 and _status(api, other_key) == 200
    staff = Staff(app, email)
    page = staff.get("/keys").text
    old_id = int(re.search(rf'data-key-id="(\d+)" data-prefix="{re.escape(old[:12])}"', page).group(1))  # type: ignore[union-attr]
    with session_scope(settings) as session:
        other_id_row = session.scalars(select(ApiKey.id).where(ApiKey.clinic_id == other_id)).one()

    for action in ("rotate", "revoke"):
        refused = staff.client.post(f"/keys/{action}", data={"csrf_token": staff.token, "key_id": other_id_row})
        assert refused.status_code == 404
    assert staff.client.post("/keys/revoke", data={"key_id": old_id}).status_code == 400  # no CSRF token
    assert _status(api, other_key) == 200 and _status(api, old) == 200

    answer = staff.client.post("/keys/rotate", data={"csrf_token": staff.token, "key_id": old_id})
    assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
    new = re.search(r'<code id="new-key">(sk_[^<]+)</code>', answer.text).group(1)  # type: ignore[union-attr]
    assert _status(api, old) == 401 and _status(api, new) == 200
    assert new not in staff.get("/keys").text  # shown once
    new_id = int(re.search(rf'data-key-id="(\d+)" data-prefix="{re.escape(new[:12])}"',  # type: ignore[union-attr]
                           staff.get("/keys").text).group(1))
    assert staff.client.post("/keys/revoke", data={"csrf_token": staff.token, "key_id": new_id}).status_code == 302
    assert _status(api, new) == 401
    assert [(a, actor, t) for a, actor, t in _audit(settings, clinic_id)] == [
        ("clinic.key_revoked", f"user:{email}", old[:12]), ("clinic.key_created", f"user:{email}", new[:12]),
        ("clinic.key_revoked", f"user:{email}", new[:12])]


def test_two_revocations_of_one_key_at_once(stack) -> None:  # type: ignore[no-untyped-def]
    """Two connections revoke one key: the second waits on the first's row lock, then is told it is already
    revoked; one audit event, one revocation time."""
    settings = stack.settings()
    clinic_id, _email = make_user(settings)
    key = _add_key(settings, clinic_id)
    outcome: list[str] = []
    with session_scope(settings) as first:
        revoke_key(first, clinic_id, "first", prefix=key[:12])  # row locked, not yet committed

        def second() -> None:
            try:
                with session_scope(settings) as session:
                    revoke_key(session, clinic_id, "second", prefix=key[:12])
                outcome.append("revoked")
            except ApiKeyError as exc:
                outcome.append(str(exc))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the second revocation waits for the first transaction"
    thread.join(30)
    assert outcome == [f"key {key[:12]} is already revoked"]
    assert [actor for _a, actor, _t in _audit(settings, clinic_id)] == ["first"]
