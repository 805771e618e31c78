"""The review workflow in headless Chromium against `skinscan serve` (issue 13): sign in, upload real images,
open the first flagged image from the job page, use the j/k/r shortcuts, record a decision, land on the next
flagged image, watch the job page's unreviewed count go down, and find the decision in the CSV export."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest

# The stack and browser fixtures of the main browser test: `skinscan serve` with a CLI-made clinic and user.
from test_browser import (  # noqa: F401 - live_server and browser are fixtures used by name
    EMAIL,
    PASSWORD,
    browser,
    console_problems,
    live_server,
    shot,
    wait_for,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
N_IMAGES = 8


def _unreviewed(driver: Any) -> int:
    """The job page's 'N flagged images not yet reviewed' number (0 when it says all are reviewed)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, "#review-status [data-role=unreviewed]")
    return int(found[0].text) if found else 0


def _image_id(url: str) -> str:
    match = re.search(r"/images/([0-9a-f]+)", url)
    assert match, url
    return match.group(1)


def test_review_workflow_in_chromium(live_server, browser, isic2017_dir):  # noqa: F811 - fixtures by name
    """Review one flagged image with the keyboard and the form; the next flagged image opens, the job page's
    unreviewed count drops by one, and the CSV export carries the decision, diagnosis and reviewer."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    base, driver = live_server, browser
    driver.get(base + "/signin")
    driver.find_element(By.ID, "email").send_keys(EMAIL)
    driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
    wait_for(lambda: driver.current_url.endswith("/jobs"), 30, "sign-in did not reach the jobs page")

    images = sorted((isic2017_dir / "ISIC-2017_Test_v2_Data").glob("ISIC_*.jpg"))[:N_IMAGES]
    driver.get(base + "/jobs/new")
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    driver.find_element(By.ID, "upload-button").click()
    # With every file accepted, the page goes straight to the new job.
    wait_for(lambda: re.search(r"/jobs/[0-9a-f]{32}", driver.current_url), 120, "the job page did not open")
    job_url = driver.current_url.split("#")[0]
    job_id = job_url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]

    def finished() -> bool:
        try:
            section = driver.find_element(By.ID, "job-progress")
            return section.get_attribute("data-status") == "done" and \
                section.get_attribute("data-reload-when-done") is None
        except Exception:  # noqa: BLE001 - the page may be reloading under us
            return False

    wait_for(finished, 300, "the job did not finish scoring")
    before = _unreviewed(driver)
    assert before >= 2, f"the smoke model flagged {before} of {N_IMAGES} images; the test needs two"
    driver.get(base + "/jobs")
    row = driver.find_element(By.XPATH, f"//tr[.//a[contains(@href, '/jobs/{job_id}')]]")
    assert row.find_element(By.CSS_SELECTOR, "[data-role=unreviewed]").text == str(before)

    # From the job page to the first flagged image (highest malignancy score first).
    driver.get(job_url)
    driver.find_element(By.ID, "start-review").click()
    wait_for(lambda: "/images/" in driver.current_url, 30, "the first flagged image did not open")
    first_url = driver.current_url
    first_id = _image_id(first_url)
    assert "Not reviewed yet" in driver.find_element(By.ID, "current-review").text
    expected_next = _image_id(driver.find_element(By.ID, "nav-next-review").get_attribute("href"))
    assert expected_next != first_id

    # j opens the next image in risk order, k comes back.
    nav = driver.find_element(By.ID, "review-nav")
    next_url = nav.get_attribute("data-next-url")
    assert next_url
    ActionChains(driver).send_keys("j").perform()
    wait_for(lambda: driver.current_url.endswith(next_url), 30, "j did not open the next image")
    assert driver.find_element(By.ID, "review-nav").get_attribute("data-prev-url").endswith(first_id)
    ActionChains(driver).send_keys("k").perform()
    wait_for(lambda: driver.current_url == first_url, 30, "k did not go back to the previous image")

    # r focuses the review form's decision; Space picks it; typing j/k/r in the note does not navigate.
    ActionChains(driver).send_keys("r").perform()
    focused = wait_for(lambda: driver.execute_script(
        "const e = document.activeElement; return e && e.name === 'decision' ? e.value : '';"), 10,
        "r did not focus the review form")
    assert focused == "agree"
    ActionChains(driver).send_keys(Keys.SPACE).perform()
    assert driver.find_element(By.ID, "decision-agree").is_selected()
    Select(driver.find_element(By.ID, "review-diagnosis")).select_by_value("mel")
    note = driver.find_element(By.ID, "review-note")
    note.send_keys("jkr: refer within two weeks")
    assert driver.current_url == first_url
    shot(driver, "08-review")
    driver.find_element(By.ID, "review-save").click()

    # The next flagged, not yet reviewed image opens, with one fewer left to review.
    wait_for(lambda: _image_id(driver.current_url) == expected_next, 30,
             f"saving did not open the next flagged image (at {driver.current_url})")
    assert "Review of" in driver.find_element(By.CSS_SELECTOR, ".flashes").text
    assert f"{before - 1} flagged image" in driver.find_element(By.ID, "unreviewed-count").text
    driver.get(job_url)
    assert _unreviewed(driver) == before - 1
    driver.get(first_url)
    current = driver.find_element(By.ID, "current-review").text
    assert f"Reviewed by {EMAIL}" in current and "Agree" in current

    # The CSV export, fetched by the page with its session cookie, carries the decision.
    body = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/jobs/{job_id}/results.csv', {{credentials: 'same-origin'}})"
        ".then(r => r.text()).then(done).catch(e => done('ERROR ' + e));")
    rows = {r["image_id"]: r for r in csv.DictReader(io.StringIO(body))}
    assert len(rows) == N_IMAGES
    reviewed = rows[first_id]
    assert (reviewed["review_decision"], reviewed["review_diagnosis"], reviewed["reviewed_by"]) == (
        "agree", "mel", EMAIL)
    assert reviewed["reviewed_at"]
    assert all(r["review_decision"] == "" for i, r in rows.items() if i != first_id)

    problems = console_problems(driver)
    assert not problems, problems
