"""Text PostgreSQL cannot store (a NUL byte, a lone surrogate) gets a 400 or 404 on real PostgreSQL, never a 500;
a sign-in refused for it still counts against the throttle."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from private_services import make_client
from test_web_pages import PASSWORD, Staff, csrf_token, make_user
from tests_helpers import replace

pytestmark = [pytest.mark.services]


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 160)).save(out, "PNG")
    return out.getvalue()


def test_unstorable_ids_and_fields_get_404_or_400(stack) -> None:  # type: ignore[no-untyped-def]
    from web import create_app

    settings = stack.settings()
    assert settings.database_url.startswith("postgresql")
    client = make_client(settings)
    for path in ("/api/v1/jobs/%00", "/api/v1/jobs/a%00b/results", "/api/v1/jobs/%ED%A0%80",
                 "/api/v1/images/%00/review"):
        resp = client.get(path) if not path.endswith("review") else client.client.post(
            path, json={"decision": "reviewed"}, headers=client.headers())
        assert resp.status_code == 404 and resp.is_json, (path, resp.status_code, resp.data[:300])
    resp = client.get("/api/v1/changes?cursor=%00")
    assert resp.status_code == 400 and "NUL" in resp.get_json()["error"], resp.data[:300]

    clinic_id, email = make_user(settings)
    staff = Staff(create_app(settings), email)
    for path in ("/jobs/%00", "/jobs/%00/status", "/images/%00"):
        assert staff.get(path).status_code == 404, path

    # A review note with a lone surrogate (JSON "\ud800"), or a NUL byte, is refused with the reason.
    job = client.submit([("one.png", _png())]).get_json()
    image_id = client.get(f"/api/v1/jobs/{job['id']}/results").get_json()["results"][0]["image_id"]
    for body in ({"decision": "reviewed", "note": "\ud800"}, {"decision": "reviewed", "note": "a\x00b"},
                 {"decision": "reviewed", "note": "ok", "\udfff": 1}):
        resp = client.client.post(f"/api/v1/images/{image_id}/review", json=body, headers=client.headers())
        assert resp.status_code == 400, (body, resp.status_code, resp.data[:300])
        assert "surrogate" in resp.get_json()["error"] or "NUL" in resp.get_json()["error"] or (
            "control characters" in resp.get_json()["error"]), resp.get_json()
    from skinscan.reviews import ReviewError, clean_review

    with pytest.raises(ReviewError, match="surrogate"):
        clean_review("reviewed", None, "\ud800")
    ok = client.client.post(f"/api/v1/images/{image_id}/review", json={"decision": "reviewed", "note": "fine ✓"},
                            headers=client.headers())
    assert ok.status_code == 201, ok.data[:300]


def test_signin_with_a_nul_email_is_400_and_counted(stack) -> None:  # type: ignore[no-untyped-def]
    from web import create_app

    settings = replace(stack.settings(), signin_failures_per_account=3, signin_failures_per_address=5,
                       signin_window_seconds=3600)
    app = create_app(settings)
    _, email = make_user(settings)

    def sign_in(address: str, who: str, password: str) -> int:
        client = app.test_client()
        client.environ_base["REMOTE_ADDR"] = address
        token = csrf_token(client.get("/signin").text)
        return client.post("/signin", data={"email": who, "password": password, "csrf_token": token}).status_code

    # One account (the same unstorable email): counted as failures, then throttled.
    assert [sign_in("192.0.2.21", "a\x00@x", "nope") for _ in range(4)] == [400, 400, 400, 429]
    # One address: unstorable emails count towards its limit too; then even the right password waits.
    assert [sign_in("192.0.2.22", f"b{i}\x00@x", "nope") for i in range(5)] == [400] * 5
    assert sign_in("192.0.2.22", email, PASSWORD) == 429
    assert sign_in("192.0.2.23", email, PASSWORD) == 302
