"""Job management on the real services: deleting a job removes its objects from the S3 server and its rows from
PostgreSQL (the audit trail keeps its record), cancelling stops a job a real Celery worker is scoring, and in
headless Chromium the job page's tiles follow the progress bar, its filters apply on change and its delete
button deletes."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from realservices import Api, missing_service
from sqlalchemy import func, select
from test_web_pages import PASSWORD, Staff, make_user

from skinscan.db import session_scope
from skinscan.tables import AuditEvent, ImageRecord, Job, JobMetrics, Prediction, Review

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def bucket_keys(stack: Any) -> set[str]:
    """Every key in the stack's bucket, listed over HTTP from the S3 server."""
    from skinscan.storage import S3Storage

    settings = stack.settings()
    return set(S3Storage(settings.s3_bucket, settings.s3_endpoint_url).list_keys(""))


def noise_jpeg(seed: int, side: int = 64) -> bytes:
    """A real JPEG of random pixels."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def job_counts(settings: Any, job_id: str) -> dict[str, int]:
    """Rows of a job in each table, read from the database."""
    with session_scope(settings) as session:
        image_ids = select(ImageRecord.id).where(ImageRecord.job_id == job_id).scalar_subquery()
        return {
            "jobs": session.scalar(select(func.count()).where(Job.id == job_id)) or 0,
            "images": session.scalar(select(func.count()).where(ImageRecord.job_id == job_id)) or 0,
            "predictions": session.scalar(select(func.count()).where(Prediction.image_id.in_(image_ids))) or 0,
            "metrics": session.scalar(select(func.count()).where(JobMetrics.job_id == job_id)) or 0,
        }


@pytest.mark.services
@pytest.mark.slow
def test_delete_removes_objects_from_s3_and_rows_from_postgres(stack, api, isic_test_images):
    """A scored job with a Grad-CAM heatmap and a review: DELETE leaves the bucket exactly as it was without the
    job's objects (another job keeps its own), removes every row of the job, keeps the audit trail (the deletion
    recorded), and a second DELETE answers the same."""
    from test_web_pages import score_in_process

    from worker.gradcam import compute_heatmap

    settings = stack.settings()
    files, truth = isic_test_images(5)
    job_id = api.submit(files, labels=truth).get_json()["id"]
    other_id = api.submit(files[:1]).get_json()["id"]
    score_in_process(settings, job_id)
    assert api.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "done"
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        first = session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id)).first()
        version, image_id = job.model_version, first.id
        session.add(Review(image_id=image_id, job_id=job_id, clinic_id=api.clinic_id, reviewer="dr@example",
                           decision="agree", model_version=version, flagged=True))
    assert compute_heatmap(image_id, version, settings)

    prefix = f"{api.clinic_id}/{job_id}/"
    before = bucket_keys(stack)
    mine = {k for k in before if k.startswith(prefix)}
    assert len(mine) == 6 and sum("/gradcam/" in k for k in mine) == 1, mine
    others = {k for k in before if k.startswith(f"{api.clinic_id}/{other_id}/")}
    assert len(others) == 1
    assert all(v > 0 for v in job_counts(settings, job_id).values())

    response = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers())
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["complete"] and body["objects_deleted"] == 6 and body["objects_left"] == 0 and body["images"] == 5

    after = bucket_keys(stack)
    assert after == before - mine and others <= after
    assert job_counts(settings, job_id) == {"jobs": 0, "images": 0, "predictions": 0, "metrics": 0}
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).where(Review.job_id == job_id)) == 0
        events = list(session.scalars(select(AuditEvent.action).where(AuditEvent.target_id == job_id)))
    assert "job.delete" in events and "job.create" in events  # the trail outlives the job
    assert api.get(f"/api/v1/jobs/{other_id}").status_code == 200
    again = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers()).get_json()
    assert again["already_deleted"] and again["complete"]


@pytest.mark.services
def test_heatmap_finished_after_its_job_was_deleted_is_not_left_behind(
        api: Api, stack: Any, isic_test_images: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Grad-CAM task that was rendering while the job was deleted (rows committed gone, objects removed) stores
    its heatmap after the deletion listed the job's objects: it sees the row gone and removes the heatmap."""
    from test_web_pages import score_in_process

    import worker.gradcam as gradcam

    settings = stack.settings()
    files, _ = isic_test_images(2)
    job_id = api.submit(files).get_json()["id"]
    score_in_process(settings, job_id)
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        version = job.model_version
        image_id = session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)).first()
    render = gradcam.render_heatmap

    def render_then_delete(*args: Any, **kwargs: Any) -> bytes:
        png = render(*args, **kwargs)
        answer = api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.headers())
        assert answer.status_code == 200 and answer.get_json()["complete"], answer.get_json()
        return png

    monkeypatch.setattr(gradcam, "render_heatmap", render_then_delete)
    assert gradcam.compute_heatmap(image_id, version, settings) is False
    assert not {k for k in bucket_keys(stack) if k.startswith(f"{api.clinic_id}/{job_id}/")}


@pytest.mark.services
@pytest.mark.slow
def test_cancel_stops_a_job_a_celery_worker_is_scoring(stack):
    """A 400-image job in chunks of one on a real worker: cancelled once scoring began, it ends `cancelled`; the
    worker scores nothing more (the remaining tasks find the job cancelled), no image stays pending, counts agree
    with the rows, and the worker goes on to score the next job."""
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic
    from web import create_app

    stack.env["SKINSCAN_CHUNK_SIZE"] = "1"
    settings = stack.settings()
    with session_scope(settings) as session:
        clinic = Clinic(name=f"cancel-{uuid.uuid4().hex[:6]}")
        session.add(clinic)
        session.flush()
        clinic_id, key = clinic.id, create_api_key(session, clinic)
    api = Api(create_app(settings).test_client(), key, clinic_id)
    job_id = api.submit([(f"lesion-{i}.jpg", noise_jpeg(i)) for i in range(400)]).get_json()["id"]
    stack.worker()
    deadline = time.monotonic() + 240
    while api.get(f"/api/v1/jobs/{job_id}").get_json()["counts"]["scored"] < 3:
        assert time.monotonic() < deadline, "the worker scored nothing in 240 s"
        time.sleep(0.1)

    response = api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "cancelled" and body["counts"]["cancelled"] > 0, body
    scored = body["counts"]["scored"]

    # The worker drains the rest of the job's tasks; a chunk in flight at the cancellation may finish its image.
    nxt = api.submit([("after-1.jpg", noise_jpeg(1001)), ("after-2.jpg", noise_jpeg(1002))]).get_json()["id"]
    api.wait(nxt, timeout=240)
    final = api.get(f"/api/v1/jobs/{job_id}").get_json()
    assert final["status"] == "cancelled" and final["counts"] == body["counts"]
    with session_scope(settings) as session:
        statuses = dict(session.execute(select(ImageRecord.status, func.count())
                                        .where(ImageRecord.job_id == job_id).group_by(ImageRecord.status)).all())
        late = session.scalar(select(func.count()).select_from(Prediction)
                              .join(ImageRecord, ImageRecord.id == Prediction.image_id)
                              .where(ImageRecord.job_id == job_id, ImageRecord.status == "cancelled")) or 0
        actions = list(session.scalars(select(AuditEvent.action).where(AuditEvent.target_id == job_id)))
    assert "pending" not in statuses and statuses.get("scored", 0) == scored
    assert statuses.get("cancelled", 0) == body["counts"]["cancelled"]
    assert late <= 1, "only the chunk in flight at the cancellation may write a prediction"
    assert "job.cancel" in actions
    rows = api.get(f"/api/v1/jobs/{job_id}/results?limit=1000").get_json()["results"]
    assert sum(1 for r in rows if r["predicted_label"]) == scored


# --- headless Chromium ---------------------------------------------------------------------------------------------

@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Debian Chromium driven by its chromedriver (as tests/services/test_browser.py does)."""
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        missing_service("headless Chromium is not installed: apt-get install chromium chromium-driver")
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
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def web_server(stack: Any) -> Iterator[tuple[str, Any]]:
    """The web app on the stack's services, served over HTTP from a thread; yields (base URL, app)."""
    from werkzeug.serving import make_server

    from web import create_app

    app = create_app(stack.settings())
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        thread.join(10)


def wait_for(predicate: Any, timeout: float, message: str) -> Any:
    """Poll predicate until it returns something true; fail with message after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


@pytest.mark.services
@pytest.mark.browser
@pytest.mark.slow
def test_job_page_tiles_filters_and_delete_in_chromium(stack, web_server, browser, isic_test_images):
    """While a job runs (its first chunk scored by the real pipeline, no worker), the summary and class tiles show
    the scored images with the progress bar; when it is done the page reloads; a filter applies as soon as it
    changes; a long file name wraps with its extension whole; delete needs its box ticked, then the job and its
    images leave the bucket. No console errors (the CSP allows no inline script)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from worker.pipeline import score_chunk

    base, app = web_server
    settings = stack.settings()
    clinic_id, email = make_user(settings)
    staff = Staff(app, email)
    files, _truth = isic_test_images(8)
    long_name = "ISIC_clinic_export_" + "x" * 60 + "_dermoscopy_image.jpeg"
    files[0] = (long_name, files[0][1])
    created = staff.upload(files)
    assert created.status_code == 201, created.text
    job_id = created.get_json()["job_id"]
    with session_scope(settings) as session:
        ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
                                   .order_by(ImageRecord.position)))

    driver = browser
    driver.get(base + "/signin")
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
    wait_for(lambda: driver.current_url.endswith("/jobs"), 30, "sign-in did not reach the jobs page")
    driver.get(f"{base}/jobs/{job_id}")

    def tile(name: str) -> str:
        return driver.find_element(By.CSS_SELECTOR, f'[data-tile="{name}"]').text

    assert tile("scored") == "0" and tile("flagged") == "0"
    score_chunk(job_id, ids[:4], settings)  # the real pipeline scores the first half
    wait_for(lambda: tile("scored") == "4", 30, "the Scored tile did not follow the job")
    bar = float(driver.find_element(By.ID, "job-progress-bar").get_attribute("value"))
    assert 0 < bar < 100
    class_sum = sum(int(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "[data-tile-class]"))
    assert class_sum == 4
    widths = [float(e.get_attribute("width")) for e in driver.find_elements(By.CSS_SELECTOR,
                                                                             "[data-tile-bar] .bar-fill")]
    assert abs(sum(widths) - 100) < 0.5
    flagged_now = int(tile("flagged"))
    assert tile("flag-context").startswith("of 4 scored")

    score_chunk(job_id, ids[4:], settings)
    wait_for(lambda: "Done" in driver.find_element(By.CSS_SELECTOR, "#job-progress [data-role=status]").text
             and tile("scored") == "8", 60, "the page did not show the job done")
    def reloaded() -> bool:
        try:  # rendered after the job finished: no reload pending, every row with its prediction
            return (driver.find_element(By.ID, "job-progress").get_attribute("data-reload-when-done") is None
                    and len(driver.find_elements(By.CSS_SELECTOR, 'tr[data-image-id]:not([data-label=""])')) == 8)
        except Exception:  # noqa: BLE001 - the page may be reloading under us
            return False

    wait_for(reloaded, 30, "the page did not reload with its results")
    assert not driver.find_elements(By.ID, "cancel-job")  # a finished job has nothing to cancel
    assert int(tile("flagged")) >= flagged_now

    # The filters apply on change: no Apply button to press.
    assert not driver.find_element(By.CSS_SELECTOR, '#results-filters [data-role="apply"]').is_displayed()
    Select(driver.find_element(By.ID, "filter-flag")).select_by_value("no")
    wait_for(lambda: "flag=no" in driver.current_url, 30, "changing the referral filter did not apply it")
    rows = driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr[data-image-id]")
    assert all(r.get_attribute("data-flagged") == "0" for r in rows)
    assert len(rows) == 8 - int(tile("flagged"))

    # The long file name wraps in its stem; the extension stays on one line.
    driver.get(f"{base}/jobs/{job_id}")
    driver.set_window_size(700, 900)
    ext = driver.find_element(By.XPATH, "//span[@class='fname-ext'][text()='.jpeg']")
    stem = ext.find_element(By.XPATH, "preceding-sibling::span[@class='fname-stem']")
    assert driver.execute_script("return arguments[0].getClientRects().length", stem) > 1  # it did wrap
    assert driver.execute_script("return arguments[0].getClientRects().length", ext) == 1
    driver.set_window_size(1280, 900)

    # Delete: refused by the browser until the box is ticked, then the job and its images are gone.
    prefix = f"{clinic_id}/{job_id}/"
    assert len({k for k in bucket_keys(stack) if k.startswith(prefix)}) == 8
    driver.find_element(By.ID, "delete-job").click()
    time.sleep(0.5)
    assert driver.current_url.endswith(f"/jobs/{job_id}")
    driver.find_element(By.ID, "delete-confirm").click()
    driver.find_element(By.ID, "delete-job").click()
    wait_for(lambda: driver.current_url.endswith("/jobs"), 30, "delete did not go back to the jobs list")
    assert "no stored image of it is left" in driver.find_element(By.CSS_SELECTOR, ".flashes").text
    assert not {k for k in bucket_keys(stack) if k.startswith(prefix)}
    assert job_counts(settings, job_id)["jobs"] == 0
    problems = [e["message"] for e in driver.get_log("browser")
                if e["level"] == "SEVERE" or "Content Security Policy" in e["message"]]
    assert not problems, problems
