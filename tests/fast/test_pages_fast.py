"""The clinic's pages, the API rate limit and the sign-in throttle on the embedded defaults (no services)."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastweb import SentTasks, make_clinic
from flask import Flask
from flask.testing import FlaskClient
from realservices import Api
from tests_helpers import replace

PASSWORD = "correct horse battery"


def make_user(settings: Any) -> tuple[str, str, str]:
    """Create a clinic with an API key and a web user; return (clinic id, key, email)."""
    from skinscan.db import session_scope
    from skinscan.security import hash_password
    from skinscan.tables import User

    clinic_id, key = make_clinic(settings)
    email = f"staff-{secrets.token_hex(3)}@clinic.example"
    with session_scope(settings) as session:
        session.add(User(clinic_id=clinic_id, email=email, password_hash=hash_password(PASSWORD)))
    return clinic_id, key, email


def csrf_token(html: str) -> str:
    """The CSRF token a page carries."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(
        r'name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(client: FlaskClient, email: str, password: str = PASSWORD) -> Any:
    """POST the sign-in form with the page's CSRF token."""
    token = csrf_token(client.get("/signin").text)
    return client.post("/signin", data={"email": email, "password": password, "csrf_token": token})


def fresh_window(seconds: int = 60, margin: float = 4.0) -> None:
    """Wait for a new fixed window if the current one ends within margin seconds (so counts are not reset)."""
    left = seconds - time.time() % seconds
    if left < margin:
        time.sleep(left + 0.05)


def test_pages_need_sign_in_and_a_csrf_token(app: Flask, settings: Any) -> None:
    """Pages redirect to sign-in; the form without its CSRF token is refused; a wrong password answers 401; the
    right one starts a session that opens the jobs page."""
    _clinic, _key, email = make_user(settings)
    client = app.test_client()
    response = client.get("/jobs")
    assert response.status_code == 302 and "/signin" in response.headers["Location"]
    assert client.post("/signin", data={"email": email, "password": PASSWORD}).status_code == 400
    assert sign_in(client, email, "wrong password").status_code == 401
    response = sign_in(client, email)
    assert response.status_code == 302 and response.headers["Location"].endswith("/jobs")
    page = client.get("/jobs")
    assert page.status_code == 200 and "not a diagnosis" in page.text.lower()


def test_pages_show_one_clinic_nothing_of_another(app: Flask, settings: Any, sent: SentTasks,
                                                  jpeg: Callable[..., bytes]) -> None:
    """A job and its image open for their clinic's staff and answer 404 to another clinic's staff."""
    from skinscan.db import session_scope
    from skinscan.tables import ImageRecord

    owner_id, owner_key, owner_email = make_user(settings)
    _other_id, _other_key, other_email = make_user(settings)
    owner_api = Api(app.test_client(), owner_key, owner_id)
    job_id = owner_api.submit([("ISIC_0000001.jpg", jpeg())]).get_json()["id"]
    with session_scope(settings) as session:
        image_id = session.query(ImageRecord.id).filter(ImageRecord.job_id == job_id).scalar()
    owner, stranger = app.test_client(), app.test_client()
    assert sign_in(owner, owner_email).status_code == 302
    assert sign_in(stranger, other_email).status_code == 302
    for url in (f"/jobs/{job_id}", f"/jobs/{job_id}/status", f"/jobs/{job_id}/results.csv",
                f"/jobs/{job_id}/results.json", f"/images/{image_id}", f"/images/{image_id}/file",
                f"/images/{image_id}/thumb"):
        assert owner.get(url).status_code == 200, url
        response = stranger.get(url)
        assert response.status_code == 404, url
        assert "ISIC_0000001" not in response.text
    assert job_id[:8] in owner.get("/jobs").text and job_id[:8] not in stranger.get("/jobs").text


def test_api_rate_limit_per_key(settings: Any, new_api: Callable[[], Api]) -> None:
    """Over the per-minute limit a key gets JSON 429 with Retry-After; another key and the health check are
    served; bad keys count against the address; a limit of 0 turns limiting off."""
    from web import create_app

    client = create_app(replace(settings, rate_limit_per_minute=3), {"TESTING": True}).test_client()
    a, b = (Api(client, x.key, x.clinic_id) for x in (new_api(), new_api()))
    fresh_window()
    assert [a.get("/api/v1/jobs").status_code for _ in range(4)] == [200, 200, 200, 429]
    limited = a.get("/api/v1/jobs")
    assert limited.get_json()["status"] == 429 and "rate limit" in limited.get_json()["error"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert b.get("/api/v1/jobs").status_code == 200
    assert client.get("/healthz").status_code == 200
    bad = [client.get("/api/v1/jobs", headers={"Authorization": "Bearer sk_not-a-real-key-0000"}).status_code
           for _ in range(4)]
    assert bad == [401, 401, 401, 429]
    off = create_app(replace(settings, rate_limit_per_minute=0), {"TESTING": True}).test_client()
    assert {off.get("/api/v1/jobs", headers=a.headers()).status_code for _ in range(6)} == {200}


def test_signin_is_throttled_per_account(settings: Any) -> None:
    """After the allowed failures for one account, even the right password answers 429 with Retry-After;
    another account from the same address still signs in."""
    from web import create_app

    app = create_app(replace(settings, signin_failures_per_account=3, signin_failures_per_address=100,
                             signin_window_seconds=3600), {"TESTING": True})
    _c, _k, email = make_user(settings)
    _c2, _k2, other = make_user(settings)
    client = app.test_client()
    assert [sign_in(client, email, "wrong").status_code for _ in range(3)] == [401, 401, 401]
    throttled = sign_in(client, email)
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) > 0
    assert sign_in(app.test_client(), other).status_code == 302


@pytest.mark.parametrize("broken", ["web.pages", "flask_wtf.csrf"])
def test_a_broken_pages_import_fails_start_up(settings: Any, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """An ImportError from the pages package (or what it imports) stops create_app instead of serving an app
    without its pages."""
    import sys

    import web
    from web import create_app

    monkeypatch.delattr(web, "pages", raising=False)
    monkeypatch.delitem(sys.modules, "web.pages", raising=False)
    monkeypatch.setitem(sys.modules, broken, None)  # importing it raises ImportError
    with pytest.raises(ImportError):
        create_app(settings)
