"""`skinscan submit` against a real embedded `skinscan serve`: one definition of a job's figures in every view,
resumable submits and `skinscan results`, and what submit skips and accepts."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from embedded import Serve, cli, embedded_env

pytestmark = [pytest.mark.slow]


@dataclass
class Embedded:
    """A running embedded service with a clinic, its key and a web user."""

    server: Serve
    env: dict[str, str]
    key: str
    email: str = "ana@clinic.example"
    password: str = "a good password"

    @property
    def url(self) -> str:
        return self.server.url

    def submit(self, *args: str, check: bool = True, cwd: Path | None = None) -> tuple[int, str, str]:
        """Run `skinscan submit ARGS --url <server> --no-progress`; return (exit code, stdout, stderr)."""
        extra = {"cwd": cwd} if cwd else {}
        out = cli({**self.env, "SKINSCAN_API_KEY": self.key}, "submit", *args, "--url", self.url, "--no-progress",
                  check=check, **extra)
        return out.returncode, out.stdout, out.stderr

    def api(self, path: str, **params: object) -> dict:  # type: ignore[type-arg]
        resp = requests.get(f"{self.url}/api/v1{path}", headers={"Authorization": f"Bearer {self.key}"},
                            params=params, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def web(self) -> requests.Session:
        """A browser-like session signed in to the pages."""
        session = requests.Session()
        page = session.get(f"{self.url}/signin", timeout=30).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        resp = session.post(f"{self.url}/signin", data={"csrf_token": token, "email": self.email,
                                                        "password": self.password, "next": ""}, timeout=30)
        assert resp.status_code == 200 and "/signin" not in resp.url, resp.text[:500]
        return session


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, service_bundle: Path) -> Iterator[Embedded]:
    """One `skinscan serve` for this module's tests, on its own data folder."""
    root = tmp_path_factory.mktemp("embedded")
    env = embedded_env(root / "data", service_bundle)
    key = cli(env, "clinics", "create", "Submit Clinic").stdout.strip().splitlines()[-1].removeprefix("API key: ")
    service = Embedded(Serve(env, root / "console.txt"), env, key)
    cli(env, "users", "create", "Submit Clinic", service.email, "--password-stdin", stdin=service.password + "\n")
    try:
        yield service
    finally:
        service.server.stop()


def _job_id(stdout: str) -> str:
    return re.search(r"^Job ([0-9a-f]+)", stdout, re.M).group(1)  # type: ignore[union-attr]


def _cell(html: str, attribute: str, value: str) -> str:
    match = re.search(rf'{attribute}="{value}"[^>]*>\s*(?:<a [^>]*>)?([^<]*)<', html)
    assert match, f"no {attribute}={value} in the page"
    return match.group(1).strip()


def test_one_messy_job_has_the_same_figures_in_every_view(embedded: Embedded, tmp_path: Path,
                                                          isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Four good images, a truncated JPEG (accepted, not scored) and a file that is no image (refused at upload):
    the CLI summary, the API, the jobs list, the job page and its status poll all say 5 images, 4 scored,
    1 not scored, 1 refused."""
    folder = tmp_path / "messy"
    folder.mkdir()
    files, _ = isic_test_images(5)
    for name, body in files[:4]:
        (folder / name).write_bytes(body)
    (folder / "truncated.jpg").write_bytes(files[4][1][:2500])
    (folder / "notes.jpg").write_bytes(b"meeting notes, not a picture")
    code, out, err = embedded.submit(str(folder), "--out", str(tmp_path / "results.csv"))
    assert code == 0, err
    job_id = _job_id(out)
    summary = out.splitlines()
    assert summary[1].split() == ["images", "accepted:", "5", "scored:", "4", "not", "scored:", "1", "flagged", "for",
                                  "review:", summary[1].split()[-1]]
    assert summary[2].strip() == "files refused at upload: 1" and summary[3].strip().startswith("notes.jpg: ")

    counts = embedded.api(f"/jobs/{job_id}")["counts"]
    assert counts == {"total": 5, "scored": 4, "failed": 1, "refused": 1}

    web = embedded.web()
    listing = web.get(f"{embedded.url}/jobs", timeout=30).text
    row = listing[listing.index(job_id[:8]):]
    assert [_cell(row, "data-role", r) for r in ("total", "scored", "failed")] == ["5", "4", "1"]
    page = web.get(f"{embedded.url}/jobs/{job_id}", timeout=30).text
    assert [_cell(page, "data-count", c) for c in ("images", "scored", "not-scored", "refused")] == \
        ["5", "4", "1", "1"]
    progress = " ".join(_cell(page, "data-role", "text").split())
    assert progress.startswith("5 of 5 images finished (100%): 4 scored, 1 could not be scored; 1 file refused")
    tiles = web.get(f"{embedded.url}/jobs/{job_id}/status", timeout=30).json()
    assert (tiles["counts"], tiles["tiles"]["total"], tiles["tiles"]["scored"], tiles["tiles"]["failed"]) == \
        (counts, 5, 4, 1)
    rows = {r["filename"]: r["status"] for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert rows["truncated.jpg"] == "failed" and rows["notes.jpg"] == "failed" and len(rows) == 6


def _post_part(embedded: Embedded, path: str, files: list[Path], **form: str) -> requests.Response:
    return requests.post(f"{embedded.url}/api/v1{path}", headers={"Authorization": f"Bearer {embedded.key}"},
                         files=[("files", (p.name, p.read_bytes())) for p in files], data=form, timeout=60)


def test_the_same_submit_resumes_its_job_and_results_fetches_any_job(embedded: Embedded, tmp_path: Path,
                                                                     isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """A run interrupted after its first part (what it sent, with the batch key the CLI derives from the files):
    the same command resumes that job, sends only the missing parts and writes the CSV; a part sent twice is
    stored once, one sent early is refused; re-running a finished batch fetches its results without uploading;
    `skinscan results JOB --out FILE` writes any job's CSV; --new-job makes another job."""
    from skinscan.cli.submit import _parts, batch_key, find_images

    folder = tmp_path / "resume"
    folder.mkdir()
    for name, body in isic_test_images(6)[0]:
        (folder / name).write_bytes(body)
    parts = _parts(find_images(folder), 2, 100 * 1024 * 1024)
    key = batch_key(parts, None)
    assert len(parts) == 3 and key == batch_key(_parts(find_images(folder), 2, 100 * 1024 * 1024), None)
    first = _post_part(embedded, "/jobs", parts[0], finalize="false", name="Resumed batch", batch_key=key)
    assert first.status_code == 202
    job_id = first.json()["id"]
    again = _post_part(embedded, "/jobs", parts[0], finalize="false", batch_key=key)  # the server knows the batch
    assert again.status_code == 200 and again.json()["id"] == job_id and again.json()["resumed"]
    early = _post_part(embedded, f"/jobs/{job_id}/images", parts[2], part="2")
    assert early.status_code == 409 and "send that one first" in early.json()["error"]
    assert embedded.api(f"/jobs/{job_id}")["parts"] == 1
    assert len(embedded.api(f"/jobs/{job_id}/results")["results"]) == 2

    out = tmp_path / "results.csv"
    code, stdout, stderr = embedded.submit(str(folder), "--part-files", "2", "--out", str(out))
    assert code == 0, stderr
    assert f"resuming job {job_id} (uploading; 1 of 3 upload parts received)" in stderr
    assert stdout.splitlines()[0] == f"Job {job_id} (Resumed batch): done"
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["filename"] for r in rows) == sorted(p.name for part in parts for p in part)
    assert all(r["status"] == "scored" for r in rows)
    assert embedded.api("/jobs", batch_key=key)["total"] == 1

    retried = _post_part(embedded, f"/jobs/{job_id}/images", parts[1], part="1")
    assert retried.status_code == 409  # the job is no longer uploading; nothing is added
    assert embedded.api(f"/jobs/{job_id}")["counts"] == {"total": 6, "scored": 6, "failed": 0, "refused": 0}

    out.unlink()
    code, stdout, stderr = embedded.submit(str(folder), "--part-files", "2", "--out", str(out))
    assert code == 0 and f"resuming job {job_id} (done; 3 of 3 upload parts received)" in stderr
    assert sorted(r["filename"] for r in csv.DictReader(out.open())) == sorted(r["filename"] for r in rows)
    assert embedded.api(f"/jobs/{job_id}")["counts"]["total"] == 6

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fetched = cli({**embedded.env, "SKINSCAN_API_KEY": embedded.key}, "results", job_id, "--url", embedded.url,
                  "--out", "mine.csv", cwd=elsewhere)
    assert fetched.stdout.splitlines()[0] == f"Job {job_id} (Resumed batch): done"
    assert (elsewhere / "mine.csv").read_text() == out.read_text()
    missing = cli({**embedded.env, "SKINSCAN_API_KEY": embedded.key}, "results", "0" * 32, "--url", embedded.url,
                  check=False)
    assert missing.returncode == 2 and "no job 0000" in missing.stderr

    code, stdout, _ = embedded.submit(str(folder), "--part-files", "2", "--out", str(out), "--new-job")
    assert code == 0 and _job_id(stdout) != job_id


def test_a_part_sent_twice_is_stored_once(embedded: Embedded, tmp_path: Path,
                                          isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """A client that retries a numbered part (its answer was lost) gets 200 duplicate_part and nothing is stored
    twice; an unnumbered part is always added."""
    files = []
    for name, body in isic_test_images(3)[0]:
        (tmp_path / name).write_bytes(body)
        files.append(tmp_path / name)
    job_id = _post_part(embedded, "/jobs", files[:1], finalize="false").json()["id"]
    sent = _post_part(embedded, f"/jobs/{job_id}/images", files[1:2], part="1")
    assert sent.status_code == 202 and sent.json()["accepted"] == 1 and sent.json()["parts"] == 2
    twice = _post_part(embedded, f"/jobs/{job_id}/images", files[1:2], part="1")
    assert twice.status_code == 200 and twice.json()["duplicate_part"] and twice.json()["accepted"] == 0
    assert len(embedded.api(f"/jobs/{job_id}/results")["results"]) == 2
    bad = _post_part(embedded, f"/jobs/{job_id}/images", files[2:], part="two")
    assert bad.status_code == 400
    assert _post_part(embedded, f"/jobs/{job_id}/images", files[2:]).status_code == 202
    assert len(embedded.api(f"/jobs/{job_id}/results")["results"]) == 3
    assert embedded.api(f"/jobs/{job_id}")["parts"] == 3


def test_submit_takes_files_folders_and_zips_and_names_every_file_it_skips(
        embedded: Embedded, tmp_path: Path, isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """`submit FOLDER IMAGE ZIP`: the folder's images, the single image and the zip's images make one job; every
    other file (a text file, a hidden file, a file without an extension, a CSV) is named with its reason; a file
    given twice is sent once; nothing but skipped files is an input error naming them."""
    import zipfile

    images = isic_test_images(5)[0]
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    (folder / images[0][0]).write_bytes(images[0][1])
    (folder / "nested" / images[1][0]).write_bytes(images[1][1])
    for name, text in (("notes.txt", "not an image"), (".DS_Store", "finder"), ("README", "read me"),
                       ("metadata.csv", "image_id,dx\n")):
        (folder / name).write_text(text)
    single = tmp_path / images[2][0]
    single.write_bytes(images[2][1])
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, body in images[3:]:
            zf.writestr(name, body)
    out = tmp_path / "results.csv"
    code, stdout, stderr = embedded.submit(str(folder), str(single), str(archive), str(folder / images[0][0]),
                                           "--out", str(out))
    assert code == 0, stderr
    said = [line for line in stderr.splitlines() if line.startswith("not uploading ")]
    assert said == [
        f"not uploading {folder / '.DS_Store'}: a hidden file, not an image",
        f"not uploading {folder / 'README'}: a file without an extension is not an image (.jpg, .jpeg, .png, .bmp, "
        ".tif, .tiff) or a .zip of images",
        f"not uploading {folder / 'metadata.csv'}: CSV files are not images; to match its labels to the images, pass "
        f"--labels {folder / 'metadata.csv'}",
        f"not uploading {folder / 'notes.txt'}: a .txt file is not an image (.jpg, .jpeg, .png, .bmp, .tif, .tiff) or "
        "a .zip of images"]
    assert stdout.splitlines()[1].split()[:6] == ["images", "accepted:", "5", "scored:", "5", "not"]
    assert sorted(r["filename"] for r in csv.DictReader(out.open())) == sorted(n for n, _ in images)

    page = f"{embedded.url}/jobs/{_job_id(stdout)}"  # a page's address given as --url: its server is used
    out.unlink()
    done = cli({**embedded.env, "SKINSCAN_API_KEY": embedded.key}, "submit", str(single), "--url", page,
               "--no-progress", "--out", str(out))
    assert f"--url {page} is a page of the SkinScan server at {embedded.url}: using {embedded.url}" in done.stderr
    assert out.is_file()

    code, stdout, stderr = embedded.submit(str(folder / "notes.txt"), check=False)
    assert code == 2 and stdout == "" and stderr.splitlines() == [
        f"not uploading {folder / 'notes.txt'}: a .txt file is not an image (.jpg, .jpeg, .png, .bmp, .tif, .tiff) "
        "or a .zip of images",
        f"skinscan submit: no images (.jpg, .png, .bmp, .tif or .zip) in {folder / 'notes.txt'}"]


def test_ctrl_c_during_the_upload_then_the_same_command_resumes(embedded: Embedded, tmp_path: Path,
                                                                isic_test_images) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C (SIGINT) while `submit` uploads part after part: the job stays open (not cancelled) and the command
    says to run it again; the same command then sends only the parts the server lacks, and the job holds every
    image exactly once."""
    import signal
    import subprocess
    import sys
    import time

    from realservices import ROOT

    from skinscan.cli.submit import _parts, batch_key, find_images

    folder = tmp_path / "many"
    folder.mkdir()
    files = isic_test_images(60)[0]
    for name, body in files:
        (folder / name).write_bytes(body)
    key = batch_key(_parts(find_images(folder), 1, 100 * 1024 * 1024), None)
    args = [sys.executable, "-m", "skinscan.cli", "submit", str(folder), "--url", embedded.url, "--no-progress",
            "--part-files", "1", "--out", str(tmp_path / "results.csv")]
    env = {**embedded.env, "SKINSCAN_API_KEY": embedded.key, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = embedded.api("/jobs", batch_key=key)["jobs"]
        if jobs and jobs[0]["parts"] >= 2:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    job = embedded.api("/jobs", batch_key=key)["jobs"][0]
    assert job["status"] == "uploading" and 2 <= job["parts"] < 60, job  # interrupted mid-upload, kept open
    assert f"job {job['id']}: upload interrupted; run the same command again to resume it" in stderr

    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    resumed = re.search(rf"resuming job {job['id']} \(uploading; (\d+) of 60 upload parts received\)", done.stderr)
    assert resumed and int(resumed.group(1)) >= job["parts"], done.stderr  # (a part in flight may have landed)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert sorted(r["filename"] for r in rows) == sorted(n for n, _ in files)  # each image once
    assert embedded.api("/jobs", batch_key=key)["total"] == 1
