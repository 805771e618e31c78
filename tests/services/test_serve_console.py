"""`skinscan serve`'s console keeps what a person needs; request and task logs go to skinscan.log in the data
folder (and to the console too with --verbose)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests
from embedded import Serve, cli, embedded_env

pytestmark = [pytest.mark.slow]


def _wait_done(url: str, key: str, job_id: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = requests.get(f"{url}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        if job.json()["status"] in ("done", "failed"):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def test_console_shows_what_a_person_needs_and_the_log_file_the_rest(tmp_path: Path, service_bundle: Path,
                                                                      isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """A session of use (a submit of 4 images and 1 broken file, its status polls, results download): the console
    has the address, the data folder, the log file, how to sign in and one line for the finished job, and no
    request or task line; skinscan.log has those. With --verbose the requests are on the console too."""
    data = tmp_path / "data"
    env = embedded_env(data, service_bundle)
    key = cli(env, "clinics", "create", "Console Clinic").stdout.strip().splitlines()[-1].removeprefix("API key: ")
    folder = tmp_path / "batch"
    folder.mkdir()
    images, truth = isic_test_images(4)
    for name, body in images:
        (folder / name).write_bytes(body)
    (tmp_path / "truth.csv").write_bytes(truth)  # labelled: the job's metrics (sklearn) warn on so few images
    (folder / "broken.jpg").write_bytes(b"not a picture")

    server = Serve(env, tmp_path / "console.txt")
    try:
        done = cli({**env, "SKINSCAN_API_KEY": key}, "submit", str(folder), "--url", server.url, "--no-progress",
                   "--name", "Console batch", "--out", str(tmp_path / "results.csv"),
                   "--labels", str(tmp_path / "truth.csv"))
        job_id = re.search(r"^Job (\S+) ", done.stdout, re.M).group(1)  # type: ignore[union-attr]
        _wait_done(server.url, key, job_id)
        time.sleep(1)  # the finished-job line is logged right after the job's commit
    finally:
        console = server.stop()
    lines = [line for line in console.splitlines() if line.strip()]
    assert lines[0] == f"SkinScan running at {server.url}/ (data in {data}); Ctrl+C to stop."
    assert lines[1] == f"Requests and tasks are logged to {data / 'skinscan.log'} (--verbose: here too)."
    assert "No web user exists yet" in console
    finished = [line for line in lines if f"job {job_id}" in line]
    assert len(finished) == 1 and finished[0].endswith(
        f"job {job_id} (Console batch) done: 4 images, 4 scored, 0 not scored; files refused at upload: 1"), \
        finished
    assert "GET /api" not in console and "POST /api" not in console and "worker.tasks" not in console
    assert len(lines) <= 10, console

    log = (data / "skinscan.log").read_text()
    assert "POST /api/v1/jobs HTTP" in log and f"GET /api/v1/jobs/{job_id} HTTP" in log
    assert "worker.tasks.score_chunk" in log and f"job {job_id} (Console batch) done" in log
    # Library warnings (when one is raised: py.warnings) go to the file only, never to the console.
    assert "Warning" not in console

    server = Serve(env, tmp_path / "verbose.txt", "--verbose")
    try:
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
        time.sleep(0.5)
    finally:
        verbose = server.stop()
    assert "GET /healthz HTTP" in verbose and "(--verbose: here too)" not in verbose
