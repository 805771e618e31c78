"""Web-facing security on real services: the sign-in redirect stays on the site, CSV exports carry no formulas,
the files-per-upload limit is the real one, sign-in is throttled, malformed headers get JSON, and the CLI never
takes a password on its command line."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest
from PIL import Image
from private_services import ServiceProcess, make_client
from realservices import ROOT, free_port, wait_port
from sqlalchemy import select
from test_web_pages import PASSWORD, Staff, csrf_token, make_user
from tests_helpers import replace

from skinscan.db import session_scope

pytestmark = [pytest.mark.services]


@pytest.fixture(scope="module")
def ham_images(ham_dir: Path) -> list[tuple[str, bytes]]:
    """Four real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[3000:3004]
    return [(p.name, p.read_bytes()) for p in paths]


def tiny_png(seed: int = 0) -> bytes:
    """A small real PNG (32 x 32)."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed % 256, 90, 160)).save(out, "PNG")
    return out.getvalue()


def add_user(settings: Any, clinic_id: str, password: str = PASSWORD) -> str:
    """Add a web user to an existing clinic; return the email."""
    from skinscan.security import hash_password
    from skinscan.tables import User

    email = f"staff-{uuid.uuid4().hex[:6]}@example.org"
    with session_scope(settings) as session:
        session.add(User(clinic_id=clinic_id, email=email, password_hash=hash_password(password)))
    return email


# --- 1. the sign-in redirect -----------------------------------------------------------------------------------

# `next` values as an attacker sends them in the query string (already percent-encoded).
HOSTILE_NEXT = ["/%09/evil.example", "/%0A/x", "/%0D/evil.example", "/%0D%0A/evil.example", "//evil.example",
                "///evil.example", "////evil.example/x", "/%5C/evil.example", "/%5C%5Cevil.example",
                "%5C%5Cevil.example", "https://evil.example/", "http:/evil.example", "javascript:alert(1)",
                "%20//evil.example", "%09//evil.example", "/%09%09/evil.example", "/%00/evil.example",
                "/%E2%80%A8/evil.example", "https:evil.example", "evil.example", "/%0B/evil.example",
                "/jobs%0D%0ASet-Cookie:%20x=1"]


def browser_target(location: str) -> tuple[str, str]:
    """(scheme, host) a browser would go to for this Location, relative to the site (URL standard parsing)."""
    cleaned = location.replace("\t", "").replace("\n", "").replace("\r", "").strip(" \x00\x01\x1f")
    parts = urlsplit(cleaned.replace("\\", "/"))
    return parts.scheme, parts.netloc


def assert_on_site(location: str, what: str) -> None:
    """The redirect goes to a path on this site."""
    assert location.startswith("/") and not location.startswith(("//", "/\\")), (what, location)
    assert browser_target(location) == ("", ""), (what, location)
    assert not any(ch in location for ch in "\t\r\n\\\x00 "), (what, location)


def test_signin_redirect_stays_on_this_site(stack) -> None:  # type: ignore[no-untyped-def]
    """Every hostile `next` (tab, newline, backslash, scheme-relative, other schemes) ends on a path of this site,
    never a 500, signed in (GET) or signing in (POST); a local path with a query is kept."""
    from web import create_app

    settings = stack.settings()
    app = create_app(settings)
    _, email = make_user(settings)
    client = app.test_client()
    token = csrf_token(client.get("/signin").text)
    for raw in HOSTILE_NEXT[:6]:  # signing in
        resp = client.post("/signin", data={"email": email, "password": PASSWORD, "csrf_token": token,
                                            "next": unquote(raw)})
        assert resp.status_code == 302, (raw, resp.status_code)
        assert_on_site(resp.headers["Location"], raw)
        token = csrf_token(client.get("/jobs").text)
    for raw in HOSTILE_NEXT:  # already signed in: GET /signin redirects at once
        resp = client.get(f"/signin?next={raw}")
        if "%00" in raw:  # a NUL byte cannot be stored or echoed: refused with 400 before any redirect
            assert resp.status_code == 400 and "Location" not in resp.headers, (raw, resp.status_code)
            continue
        assert resp.status_code == 302, (raw, resp.status_code, resp.text[:200])
        assert_on_site(resp.headers["Location"], raw)
    kept = client.get("/signin?next=" + quote("/jobs/abc?page=2&sort=malignancy", safe=""))
    assert kept.headers["Location"] == "/jobs/abc?page=2&sort=malignancy"
    signed_out = app.test_client()
    page = signed_out.get("/signin?next=/%09/evil.example")
    assert page.status_code == 200 and 'name="next" value="/jobs"' in page.text
    assert signed_out.get("/signin?next=/%0A/x").status_code == 200


# --- 3. CSV formulas -------------------------------------------------------------------------------------------

FORMULA_NAMES = ["=cmd|' -c calc'!A0.jpg", "+SUM(1+1)*cmd.jpg", "-2+3+cmd.jpg", "@SUM(1+1)*cmd.jpg"]


def test_csv_exports_escape_formulas(stack, ham_images) -> None:  # type: ignore[no-untyped-def]
    """File names a spreadsheet would run as formulas come out of the API's ?format=csv and the page's export
    prefixed with a quote (OWASP); every other cell is unchanged."""
    settings = stack.settings()
    client = make_client(settings)
    files = [(name, data) for name, (_, data) in zip(FORMULA_NAMES, ham_images, strict=True)]
    files.append(("=HYPERLINK(evil.example).txt", b"not an image"))
    files.append(("\uff1dHYPERLINK(evil.example).txt", b"not an image"))  # fullwidth equals sign
    files.append(("plain name.jpg", ham_images[0][1]))
    resp = client.submit(files)
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    staff = Staff(client.client.application, add_user(settings, client.clinic_id))
    exports = {"api": client.get(f"/api/v1/jobs/{job_id}/results?format=csv").get_data(as_text=True),
               "page": staff.get(f"/jobs/{job_id}/results.csv").get_data(as_text=True)}
    for via, text in exports.items():
        rows = list(csv.DictReader(io.StringIO(text)))
        names = [r["filename"] for r in rows]
        assert names == ["'" + n for n in FORMULA_NAMES] + ["'=HYPERLINK(evil.example).txt",
                                                            "'\uff1dHYPERLINK(evil.example).txt", "plain name.jpg"], via
        for row in rows:
            for column, cell in row.items():
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\uff1d")), (via, column, cell)
        assert rows[-1]["status"] == "pending" and rows[4]["status"] == "failed" and rows[4]["error"], via


def test_csv_cell_rule_and_change_report() -> None:
    """The one helper: =, +, -, @, tab and CR at the start get a quote; numbers and other text are unchanged;
    the re-score change report uses it too."""
    from skinscan.changes import iter_changes_csv
    from skinscan.csvsafe import csv_cell

    lookalikes = ("\uff1d1+1", "\uff0b1", "\uff0d1", "\uff20x", "\ufe661+1", "\ufe62x", "\ufe63x", "\ufe6bx",
                  "\u207c1", "\u208c1", "\u207a1", "\u22121", "\u207b1")  # fullwidth, small, super/subscript, minus
    for bad in ("=1+1", "+1", "-1", "@x", "\tx", "\rx", *lookalikes):
        assert csv_cell(bad) == "'" + bad
    for fine in ("ISIC_0000001.jpg", "a=b", "", " =1", "\u00e9t\u00e9.jpg", "\uff21.jpg", 3, None, 0.5):
        assert csv_cell(fine) == fine
    row = {"image_id": "i1", "job_id": "j1", "filename": "=cmd|' /c calc'!A0.jpg", "change": "label_changed",
           "previous_model": "m1", "previous_label": "nv", "previous_malignancy": 0.1, "previous_flagged": False,
           "new_model": "m2", "new_label": "mel", "new_malignancy": 0.7, "new_flagged": True, "true_label": "@mel"}
    out = list(csv.DictReader(io.StringIO("".join(iter_changes_csv([row])))))
    assert out[0]["filename"] == "'=cmd|' /c calc'!A0.jpg" and out[0]["true_label"] == "'@mel"
    assert out[0]["new_malignancy"] == "0.700000"


# --- 6. the files-per-upload limit -----------------------------------------------------------------------------

def test_max_files_is_the_real_limit(stack) -> None:  # type: ignore[no-untyped-def]
    """1,001 files in one request are accepted under the default limit (Werkzeug's 1,000 form parts no longer
    apply first); over SKINSCAN_MAX_FILES the 413 names the file limit, not the byte limit, however far over."""
    settings = stack.settings()
    assert settings.max_files == 10_000
    client = make_client(settings)
    png = tiny_png()
    resp = client.submit([(f"img{i:04d}.png", png) for i in range(1001)])
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["accepted"] == 1001

    small = replace(settings, max_files=50)
    limited = make_client(small)
    assert limited.submit([(f"a{i}.png", png) for i in range(50)]).status_code == 202
    for count in (51, 114, 115, 400):  # just over the limit, and past the multipart parts limit (50 + 64)
        over = limited.submit([(f"b{i}.png", png) for i in range(count)])
        assert over.status_code == 413, (count, over.get_json())
        error = over.get_json()["error"]
        assert "more than 50 files" in error and "bytes" not in error, (count, error)
    big = replace(settings, max_files=50, max_upload_bytes=20_000)
    too_big = make_client(big).submit([("big.png", png + b"\0" * 30_000)])
    assert too_big.status_code == 413 and "20,000 bytes" in too_big.get_json()["error"]
    # The pages name the same limit.
    staff = Staff(limited.client.application, add_user(small, limited.clinic_id))
    page = staff.upload([(f"c{i}.png", png) for i in range(200)])
    assert page.status_code == 413 and "more than 50 files" in page.get_json()["error"].lower()
    html = staff.upload([(f"c{i}.png", png) for i in range(200)], xhr=False)
    assert html.status_code == 413 and "more than 50 files" in html.text.lower(), html.text[-800:]


# --- 8. sign-in throttle ---------------------------------------------------------------------------------------

WINDOW = 3600


def _sign_in(client: Any, email: str, password: str) -> Any:
    token = csrf_token(client.get("/signin").text)
    return client.post("/signin", data={"email": email, "password": password, "csrf_token": token})


def _from(app: Any, address: str) -> Any:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def test_signin_is_throttled_per_account_and_address(stack) -> None:  # type: ignore[no-untyped-def]
    """After the configured failures an account gets 429 (with Retry-After and a clear message) even with the
    right password, from any address and any web process sharing Redis; an address gets 429 for every account;
    other accounts and addresses are unaffected."""
    from web import create_app

    # The defaults: 10 failures of one account in 15 minutes, then 429.
    default = stack.settings()
    _, dave = make_user(default)
    guesser = _from(create_app(default), "192.0.2.50")
    assert [_sign_in(guesser, dave, f"guess-{i}").status_code for i in range(11)] == [401] * 10 + [429]

    settings = replace(default, signin_failures_per_account=5, signin_failures_per_address=8,
                       signin_window_seconds=WINDOW)
    assert settings.redis_url
    app, other_process = create_app(settings), create_app(settings)
    _, alice = make_user(settings)
    _, bob = make_user(settings)
    _, carol = make_user(settings)
    attacker = _from(app, "203.0.113.7")
    assert [_sign_in(attacker, alice, f"guess-{i}").status_code for i in range(5)] == [401] * 5
    refused = _sign_in(attacker, alice, PASSWORD)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 2 * WINDOW
    assert "Too many failed sign-ins" in refused.text and "try again in" in refused.text
    # The account is throttled from elsewhere too, also in another web process (counters in Redis).
    assert _sign_in(_from(other_process, "198.51.100.2"), alice, PASSWORD).status_code == 429
    # The address: 3 more failures on another account reach its limit of 8; then every account is refused there.
    assert [_sign_in(attacker, bob, f"guess-{i}").status_code for i in range(3)] == [401] * 3
    assert _sign_in(attacker, carol, PASSWORD).status_code == 429
    assert _sign_in(_from(other_process, "203.0.113.7"), bob, PASSWORD).status_code == 429
    # Another address signs bob in; nothing was locked for him there.
    assert _sign_in(_from(app, "198.51.100.3"), bob, PASSWORD).status_code == 302
    # Redis unreachable: each process counts on its own, the throttle stays on.
    down = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0"))
    lone = _from(down, "192.0.2.9")
    assert [_sign_in(lone, carol, "nope").status_code for _ in range(6)] == [401] * 5 + [429]
    # Off when configured off.
    off = _from(create_app(replace(settings, signin_failures_per_account=0, signin_failures_per_address=0,
                                   redis_url=None)), "192.0.2.10")
    assert all(_sign_in(off, carol, "nope").status_code == 401 for _ in range(12))


# --- 10. NUL bytes in headers, passwords on the command line -----------------------------------------------------

def _raw_get(port: int, path: str, header: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header +
                     b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_nul_in_a_header_gets_json_400(stack) -> None:  # type: ignore[no-untyped-def]
    """A header with a NUL byte gets a JSON 400 from `skinscan web` (gunicorn answers it before the app) and from
    the app itself (Werkzeug's server passes it on); ordinary requests are served as before."""
    port = free_port()
    web = ServiceProcess(stack.env, stack.tmp / "web.log", "web", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--threads", "2").start()
    try:
        wait_port("127.0.0.1", port, timeout=120)
        for header in (b"X-Trace: a\x00b", b"Authorization: Bearer sk_\x00abc", b"X\x00Evil: 1"):
            status, headers, body = _raw_get(port, "/api/v1/jobs", header)
            assert status == 400, (header, body[:300])
            assert headers["content-type"] == "application/json", (header, headers, body[:300])
            parsed = json.loads(body)
            assert parsed["status"] == 400 and parsed["error"], parsed
            assert headers["x-content-type-options"] == "nosniff"
        status, headers, body = _raw_get(port, "/healthz", b"X-Trace: ok")
        assert status == 200 and json.loads(body)
    finally:
        web.stop()
    client = make_client(stack.settings())
    for headers in ({"X-Trace": "a\x00b"}, {"Authorization": f"Bearer {client.key}\x00"}):
        resp = client.client.get("/api/v1/jobs", headers=headers)
        assert resp.status_code == 400 and resp.is_json and "NUL" in resp.get_json()["error"], resp.data[:200]
    assert client.get("/api/v1/jobs").status_code == 200


def _users_create(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skinscan.cli", "users", "create", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, input=stdin)


def test_users_create_takes_the_password_from_stdin_not_argv(stack) -> None:  # type: ignore[no-untyped-def]
    """`skinscan users create --password-stdin` reads the password from a pipe (nothing on the command line for
    `ps` to show); the old `--password VALUE` is refused with a pointer to it and creates nothing."""
    from skinscan.security import verify_password
    from skinscan.tables import User

    settings = stack.settings()
    client = make_client(settings, "CLI Clinic")
    secret = "a-password-no-ps-may-show-" + uuid.uuid4().hex[:8]
    out = _users_create(stack.env, "CLI Clinic", "piped@example.org", "--password-stdin", stdin=secret + "\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert secret not in out.stdout + out.stderr
    argv_form = _users_create(stack.env, "CLI Clinic", "argv@example.org", "--password", secret)
    assert argv_form.returncode != 0 and "--password-stdin" in argv_form.stderr
    empty = _users_create(stack.env, "CLI Clinic", "empty@example.org", "--password-stdin", stdin="")
    assert empty.returncode != 0 and "no password" in empty.stderr
    with session_scope(settings) as session:
        users = {u.email: u for u in session.scalars(select(User).where(User.clinic_id == client.clinic_id))}
        assert set(users) == {"piped@example.org"}
        assert verify_password(users["piped@example.org"], secret)
