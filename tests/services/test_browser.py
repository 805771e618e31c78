"""End to end in headless Chromium against `skinscan serve`: sign in, upload 20 real images, watch the progress bar,
sort the results, see an image's Grad-CAM heatmap, download the CSV; screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realservices import ROOT, free_port, missing_service, wait_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "artifacts" / "screenshots"
PASSWORD = "browser-test-password"
EMAIL = "nurse@browser-clinic.example"


def _cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    out = subprocess.run([sys.executable, "-m", "skinscan.cli", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, input=stdin)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture()
def live_server(tmp_path: Path, smoke_bundle: Path) -> Iterator[str]:
    """`skinscan serve` (SQLite, local images, in-process worker) with a clinic and a user made by the CLI."""
    from test_web_pages import add_plots_and_card

    add_plots_and_card(smoke_bundle)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "SKINSCAN_ENV")}
    env.update({"SKINSCAN_DATA_DIR": str(tmp_path / "data"), "SKINSCAN_MODEL": str(smoke_bundle),
                "SKINSCAN_CHUNK_SIZE": "4"})
    _cli(env, "clinics", "create", "Browser Clinic")
    _cli(env, "users", "create", "Browser Clinic", EMAIL, "--password-stdin", stdin=PASSWORD + "\n")
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "skinscan.cli", "serve", "--port", str(port)], env=env,
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Debian Chromium driven by its chromedriver (never a downloaded browser)."""
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        missing_service("headless Chromium is not installed: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str, width: int = 1280) -> Path:
    """Save a screenshot of the whole page (the window is stretched to the page's height for it)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 600)")
    driver.set_window_size(width, min(int(height) + 140, 6000))
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)
    return path


def console_problems(driver: Any) -> list[str]:
    """Browser console errors: script errors and anything the Content-Security-Policy blocked."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" or "Content Security Policy" in e["message"]]


def wait_for(predicate: Any, timeout: float, message: str, interval: float = 0.25) -> Any:
    """Poll predicate until it returns something true; fail with message after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(interval)


def test_clinic_workflow_in_chromium(live_server, browser, isic2017_dir, tmp_path):
    """Sign in, upload 20 ISIC 2017 images + labels, watch progress to 100%, sort, open an image and its
    heatmap, download the CSV, visit the model page; screenshots of each page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, driver = live_server, browser
    for name in ("01-sign-in", "02-jobs", "03-new-job", "04-job", "05-image", "06-model", "07-job-mobile"):
        (SHOTS / f"{name}.png").unlink(missing_ok=True)

    # Sign in (the start page sends us to the form).
    driver.get(base + "/")
    assert driver.current_url.startswith(base + "/signin")
    assert "Decision support, not a diagnosis" in driver.find_element(By.CSS_SELECTOR, ".notice").text
    shot(driver, "01-sign-in")
    driver.find_element(By.ID, "email").send_keys(EMAIL)
    driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
    wait_for(lambda: driver.current_url.endswith("/jobs"), 30, "sign-in did not reach the jobs page")
    assert EMAIL in driver.find_element(By.CSS_SELECTOR, ".who").text

    # Upload 20 real images and their labels through the file inputs; a stray text file is refused in the page.
    folder = isic2017_dir / "ISIC-2017_Test_v2_Data"
    images = sorted(folder.glob("ISIC_*.jpg"))[:20]
    ids = {p.stem for p in images}
    truth = (isic2017_dir / "ISIC-2017_Test_v2_Part3_GroundTruth.csv").read_text().splitlines()
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([truth[0], *[r for r in truth[1:] if r.split(",")[0] in ids]]) + "\n")
    stray = tmp_path / "notes.txt"
    stray.write_text("not an image")
    broken = tmp_path / "broken.jpg"  # passes the page's own check by its name; the server refuses its content
    broken.write_bytes(b"this is a text file named like a JPEG")
    driver.get(base + "/jobs/new")
    driver.find_element(By.ID, "job-name").send_keys("Browser batch 7")
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in [*images, broken, stray]))
    driver.find_element(By.ID, "labels").send_keys(str(labels))
    summary = driver.find_element(By.ID, "file-summary").text
    assert "21 files ready to upload" in summary and "notes.txt" in summary and "not a supported file type" in summary
    shot(driver, "03-new-job")
    driver.find_element(By.ID, "upload-button").click()
    result = wait_for(lambda: driver.find_element(By.ID, "upload-result").text, 120, "no answer to the upload")
    assert "20 images accepted" in result and "notes.txt" in result, result
    # One count: the accepted images in the info box, every refusal (the page's and the server's) in the red one.
    accepted_box = driver.find_element(By.CSS_SELECTOR, "#upload-result .alert-info").text
    refused_box = driver.find_element(By.CSS_SELECTOR, "#upload-result .alert-error").text
    assert "20 images accepted" in accepted_box and "broken.jpg" not in accepted_box, accepted_box
    assert "2 files were refused" in refused_box and "broken.jpg" in refused_box and "notes.txt" in refused_box
    driver.find_element(By.LINK_TEXT, "Open the job").click()

    # The progress bar climbs to 100%; the page then reloads itself with the results.
    wait_for(lambda: "/jobs/" in driver.current_url, 30, "the job page did not open")
    job_url = driver.current_url
    seen: list[float] = []

    def finished() -> bool:
        try:
            bar = driver.find_element(By.ID, "job-progress-bar")
            seen.append(float(bar.get_attribute("value")))
            section = driver.find_element(By.ID, "job-progress")
            rows = driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr[data-image-id]")
            reloaded = section.get_attribute("data-reload-when-done") is None  # rendered after the job finished
            return section.get_attribute("data-status") == "done" and reloaded and len(rows) == 20 and seen[-1] == 100
        except Exception:  # noqa: BLE001 - the page may be reloading under us
            return False

    try:
        wait_for(finished, 300, "the progress bar did not reach 100%", 0.2)
    except AssertionError:
        raise AssertionError(f"the progress bar did not reach 100% (values seen: {sorted(set(seen))}) on "
                             f"{driver.current_url}: {driver.find_element(By.TAG_NAME, 'main').text[:3000]}") from None
    text = driver.find_element(By.ID, "progress-text").text
    assert "20 of 20 images finished (100%)" in text
    assert "Files refused at upload (1)" in driver.page_source and "broken.jpg" in driver.page_source
    assert "Agreement with your labels" in driver.page_source
    shot(driver, "04-job")
    shot(driver, "07-job-mobile", width=390)

    # Default order is highest malignancy first; sort ascending with the keyboard on the column header.
    def scores() -> list[float]:
        return [float(r.get_attribute("data-malignancy"))
                for r in driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr[data-image-id]")]

    first = scores()
    assert first == sorted(first, reverse=True) and len(set(first)) > 1
    header = driver.find_element(By.CSS_SELECTOR, 'a[data-sort="malignancy"]')
    header.send_keys(Keys.ENTER)
    wait_for(lambda: "dir=asc" in driver.current_url, 30, "sorting did not change the page")
    assert driver.find_element(By.CSS_SELECTOR, 'th[aria-sort="ascending"] a[data-sort="malignancy"]')
    assert scores() == sorted(first)

    # The CSV export, fetched by the page with its session cookie.
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    body = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/jobs/{job_id}/results.csv', {{credentials: 'same-origin'}})"
        ".then(r => r.text()).then(done).catch(e => done('ERROR ' + e));")
    rows = list(csv.DictReader(io.StringIO(body)))  # every uploaded file: the images in risk order, then refusals
    assert len(rows) == 21 and all(r["status"] == "scored" for r in rows[:20])
    assert rows[20]["filename"] == "broken.jpg" and rows[20]["status"] == "failed"
    rows = rows[:20]
    assert {r["filename"] for r in rows} == {p.name for p in images}

    # An image page: the picture, the probabilities, and the Grad-CAM heatmap computed by the worker.
    driver.find_element(By.CSS_SELECTOR, "#results-table tbody tr[data-image-id] td.col-file a").click()
    wait_for(lambda: "/images/" in driver.current_url, 30, "the image page did not open")
    assert "Class probabilities" in driver.page_source
    # A worker's PNG (bundles without a feature-map output) or the kept grid drawn on the image by the page.
    wait_for(lambda: driver.execute_script(
        "const i = document.getElementById('heatmap-image'); const c = document.getElementById('heatmap-canvas');"
        "return (i && !i.hidden && i.complete && i.naturalWidth) || (c && !c.hidden && c.width);"),
        240, "the Grad-CAM heatmap did not load")
    assert driver.execute_script("return document.querySelector('img.lesion').naturalWidth") > 0
    shot(driver, "05-image")

    driver.get(base + "/jobs")
    listing = driver.find_element(By.CSS_SELECTOR, "table.data").text
    assert job_id[:8] in listing and "Browser batch 7" in listing
    shot(driver, "02-jobs")
    driver.get(base + "/model")
    assert "smoke-test" in driver.page_source
    wait_for(lambda: driver.execute_script(
        "return [...document.querySelectorAll('.plots img')].every(i => i.complete && i.naturalWidth > 0)"),
        30, "the model's plots did not load")
    shot(driver, "06-model")

    problems = console_problems(driver)
    assert not problems, problems
    driver.find_element(By.CSS_SELECTOR, ".who button").click()
    wait_for(lambda: "/signin" in driver.current_url, 30, "sign-out did not return to the sign-in page")
    driver.get(job_url)
    assert "/signin" in driver.current_url
