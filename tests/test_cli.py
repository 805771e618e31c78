"""The `skinscan` command line in subprocesses on an embedded data directory (SQLite in tmp_path): the first
run's output, clinics and users, `submit`'s answers to a wrong folder, URL or key, and a light `--help`."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from realservices import ROOT, free_port

from skinscan.cli.submit import SubmitError, normalise_url

SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "SKINSCAN_ENV", "SKINSCAN_MODEL",
                     "SKINSCAN_API_KEY", "SKINSCAN_URL", "SKINSCAN_USER_PASSWORD")


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh embedded install: data in tmp_path, no services."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env["SKINSCAN_DATA_DIR"] = str(tmp_path / "data")
    return env


def run(env: dict[str, str], *args: str, stdin: str | None = None, python: tuple[str, ...] = ()) -> \
        subprocess.CompletedProcess[str]:
    """Run `python -m skinscan.cli ARGS` and return the finished process."""
    return subprocess.run([sys.executable, *python, "-m", "skinscan.cli", *args], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=300, input=stdin if stdin is not None else "")


def ok(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    """Run a command that must succeed; return its standard output."""
    out = run(env, *args, stdin=stdin)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_help_imports_neither_torch_nor_the_web_stack(env: dict[str, str]) -> None:
    """`skinscan --help` (and a sub-command's) loads the parser only: no torch, Flask, Celery, SQLAlchemy."""
    for args in (("--help",), ("submit", "--help"), ("users", "reset-password", "--help")):
        out = run(env, *args, python=("-X", "importtime"))
        assert out.returncode == 0, out.stderr[-2000:]
        loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
        heavy = {"torch", "torchvision", "flask", "celery", "sqlalchemy", "alembic", "requests", "training.train"}
        assert not heavy & loaded, heavy & loaded
    assert "SKINSCAN_API_KEY" in run(env, "submit", "--help").stdout


def test_every_option_has_help_text() -> None:
    """No option of any sub-command is left without a help text."""
    import argparse

    from skinscan.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and action.help is None:
                missing.append(f"{path} {action.option_strings[0]}")

    walk(build_parser(), "skinscan")
    assert missing == []


def test_first_run_clinics_and_users(env: dict[str, str], tmp_path: Path) -> None:
    """clinics create prints its key labelled on the last line with no Alembic chatter; clinics list, users create,
    users list and reset-password (read from standard input, audited, the old password stops working)."""
    first = run(env, "clinics", "create", "My Clinic")
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"API key: sk_[A-Za-z0-9_-]{20,}", key)
    assert "SKINSCAN_API_KEY" in first.stdout
    assert "Context impl" not in first.stderr and "Running upgrade" not in first.stderr
    assert len((first.stdout + first.stderr).strip().splitlines()) <= 6  # on one screen, the key last

    again = run(env, "clinics", "create", "My Clinic")
    assert again.returncode == 1 and "exists; pass --new-key" in again.stderr
    assert ok(env, "clinics", "create", "My Clinic", "--new-key").strip().splitlines()[-1].startswith("API key: ")
    ok(env, "clinics", "create", "Second Clinic")
    listing = run(env, "clinics", "list")
    assert listing.returncode == 0 and listing.stderr == ""  # a routine command: no schema logs
    table = [line.split() for line in listing.stdout.strip().splitlines()]
    assert table[0] == ["Clinic", "Keys", "Users", "Jobs", "Retention", "Created"]
    assert table[1][:6] == ["My", "Clinic", "2", "0", "0", "keep"]
    assert table[2][:6] == ["Second", "Clinic", "1", "0", "0", "keep"]
    refused = run(env, "clinics", "retention", "My Clinic", "--days", "0")
    assert refused.returncode == 1 and "between 1 and 36500 days" in refused.stderr
    assert "no clinic named 'Nobody'" in run(env, "clinics", "retention", "Nobody", "--days", "5").stderr
    assert "kept 30 days after upload" in ok(env, "clinics", "retention", "My Clinic", "--days", "30")
    assert ok(env, "clinics", "list").strip().splitlines()[1].split()[5:7] == ["30", "d"]
    assert ok(env, "apply-retention").strip() == "0"  # nothing is 30 days old yet

    assert "No web users yet" in ok(env, "users", "list")
    ok(env, "users", "create", "My Clinic", "Ana@Clinic.example", "--password-stdin", stdin="first password\n")
    ok(env, "users", "create", "Second Clinic", "bo@clinic.example", "--password-stdin", stdin="other password\n")
    users = ok(env, "users", "list").strip().splitlines()
    assert users[0].split() == ["Email", "Created", "Clinic"]
    assert [u.split()[0] for u in users[1:]] == ["ana@clinic.example", "bo@clinic.example"]
    assert [u.split()[0] for u in ok(env, "users", "list", "--clinic", "Second Clinic").splitlines()[1:]] == \
        ["bo@clinic.example"]

    db = tmp_path / "data" / "skinscan.db"

    def password_hash() -> str:
        with sqlite3.connect(db) as con:
            return con.execute("select password_hash from users where email = 'ana@clinic.example'").fetchone()[0]

    before = password_hash()
    short = run(env, "users", "reset-password", "ana@clinic.example", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "at least 8 characters" in short.stderr and password_hash() == before
    reset = ok(env, "users", "reset-password", "ANA@clinic.example", "--password-stdin", stdin="second password\n")
    assert "Password of ana@clinic.example changed" in reset
    from werkzeug.security import check_password_hash

    after = password_hash()
    assert after != before and check_password_hash(after, "second password")
    assert not check_password_hash(after, "first password")
    with sqlite3.connect(db) as con:
        actions = [r[0] for r in con.execute("select action from audit_events where target_id = "
                                             "'ana@clinic.example' order by id")]
    assert actions == ["user.create", "user.password_reset"]
    piped = ok(env, "users", "create", "My Clinic", "cy@clinic.example", stdin="piped password\n")  # no option
    assert "password:" not in piped  # read from the pipe, not generated
    with sqlite3.connect(db) as con:
        cy = con.execute("select password_hash from users where email = 'cy@clinic.example'").fetchone()[0]
    assert check_password_hash(cy, "piped password")
    unknown = run(env, "users", "reset-password", "nobody@clinic.example", "--password-stdin", stdin="whatever1\n")
    assert unknown.returncode == 1 and unknown.stderr.strip() == \
        "no user 'nobody@clinic.example' (`skinscan users list` shows them)"
    on_argv = run(env, "users", "reset-password", "ana@clinic.example", "--password", "visible-in-ps")
    assert on_argv.returncode == 1 and "--password-stdin" in on_argv.stderr


def test_data_follows_the_user_not_the_working_directory(tmp_path: Path) -> None:
    """Without SKINSCAN_DATA_DIR the data lives in the per-user folder (platformdirs): a clinic created from one
    folder is listed from another and no ./skinscan-data appears; SKINSCAN_DATA_DIR still overrides it."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES and k != "SKINSCAN_DATA_DIR"}
    env["XDG_DATA_HOME"] = str(tmp_path / "user-data")
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()

    def cli(cwd: Path, *args: str, extra: dict[str, str] | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "skinscan.cli", *args], env={**env, **(extra or {})}, cwd=cwd,
                             text=True, capture_output=True, timeout=300, input="")
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cli(here, "clinics", "create", "Moving Clinic")
    created = cli(here, "clinics", "create", "Second Clinic")
    assert f"(data in {tmp_path / 'user-data' / 'skinscan'})" in created
    assert "Moving Clinic" in cli(there, "clinics", "list")
    assert (tmp_path / "user-data" / "skinscan" / "skinscan.db").is_file()
    assert not (here / "skinscan-data").exists() and not (there / "skinscan-data").exists()
    override = {"SKINSCAN_DATA_DIR": str(tmp_path / "elsewhere")}
    assert f"No clinics yet in {tmp_path / 'elsewhere'}:" in cli(there, "clinics", "list", extra=override)
    assert (tmp_path / "elsewhere" / "skinscan.db").is_file()


def test_normalise_url_forms() -> None:
    """http:// is added when missing (and said), /api/v1 at the end is accepted, other schemes are refused."""
    assert normalise_url("http://127.0.0.1:8001") == ("http://127.0.0.1:8001", None)
    assert normalise_url("https://scan.example/api/v1/") == ("https://scan.example", None)
    assert normalise_url("http://proxy.example/skinscan/") == ("http://proxy.example/skinscan", None)
    base, note = normalise_url("127.0.0.1:8001/api/v1")
    assert base == "http://127.0.0.1:8001" and note is not None and note.endswith("using http://127.0.0.1:8001")
    for bad in ("ftp://files.example", "", "http://"):
        with pytest.raises(SubmitError) as info:
            normalise_url(bad)
        assert info.value.code == 2


def test_submit_says_what_is_wrong_in_one_sentence(env: dict[str, str], tmp_path: Path, jpeg_bytes: bytes) -> None:
    """A missing folder, no key, a URL nobody answers, a wrong scheme, a malformed labels file: one line on
    standard error each, with distinct exit codes, and nothing uploaded."""
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "ISIC_1.jpg").write_bytes(jpeg_bytes)
    port = free_port()  # nothing listens there
    env = {**env, "SKINSCAN_API_KEY": "sk_not_checked_before_the_server_answers"}

    def submit(*args: str, key_env: dict[str, str] | None = None) -> tuple[int, str]:
        out = run(key_env or env, "submit", *args, "--no-progress")
        assert out.stdout == ""
        return out.returncode, out.stderr.strip()

    assert submit(str(tmp_path / "nope"), "--url", f"http://127.0.0.1:{port}") == (
        2, f"skinscan submit: {tmp_path / 'nope'} does not exist (give image files, zips or folders of them)")
    assert submit(str(folder), "--url", f"http://127.0.0.1:{port}") == (
        3, f"skinscan submit: no SkinScan server at http://127.0.0.1:{port}: is `skinscan serve` running?")
    code, err = submit(str(folder), "--url", f"127.0.0.1:{port}/api/v1")
    assert code == 3 and err.splitlines() == [
        f"no http:// or https:// in --url '127.0.0.1:{port}/api/v1': using http://127.0.0.1:{port}",
        f"skinscan submit: no SkinScan server at http://127.0.0.1:{port}: is `skinscan serve` running?"]
    assert submit(str(folder), "--url", "ftp://127.0.0.1") == (
        2, "skinscan submit: --url 'ftp://127.0.0.1' must start with http:// or https://")
    no_key = {k: v for k, v in env.items() if k != "SKINSCAN_API_KEY"}
    assert submit(str(folder), "--url", f"http://127.0.0.1:{port}", key_env=no_key) == (
        2, "skinscan submit: no API key: set SKINSCAN_API_KEY to the key `skinscan clinics create` printed")
    (tmp_path / "labels.csv").write_text("image_id,dx\nISIC_1,cancer\n")
    code, err = submit(str(folder), "--url", f"http://127.0.0.1:{port}", "--labels", str(tmp_path / "labels.csv"))
    assert code == 2 and err == (f"skinscan submit: labels file {tmp_path / 'labels.csv'}: line 2: unknown diagnosis "
                                 "'cancer'; expected one of akiec, bcc, bkl, df, mel, nv, vasc")


@pytest.fixture()
def jpeg_bytes() -> bytes:
    """A small real JPEG."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (180, 120, 90)).save(out, format="JPEG")
    return out.getvalue()


def test_serve_keeps_celery_root_advice_from_its_user() -> None:
    """`serve`'s in-process worker: Celery's "running as root" SecurityWarning is filtered, nothing else is."""
    import warnings

    from celery.exceptions import SecurityWarning

    from skinscan.cli.service import _quiet_embedded_worker

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_embedded_worker()
        warnings.warn(SecurityWarning("You're running the worker with superuser privileges: this is\nabsolutely "
                                      "not recommended!"), stacklevel=1)
        warnings.warn(SecurityWarning("some other advice"), stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other advice"]
