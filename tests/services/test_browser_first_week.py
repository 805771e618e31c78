"""The pages in headless Chromium against `skinscan serve` (the shipped model): the upload form starts each batch
clean, and the review screen fits a 1400x1000 window."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from embedded import Serve, cli, embedded_env
from test_browser import SHOTS, browser, console_problems, wait_for  # noqa: F401 - browser is a fixture by name

pytestmark = [pytest.mark.browser, pytest.mark.slow]
EMAIL, PASSWORD = "reviewer@first-week.example", "first-week-password"


@dataclass
class Served:
    url: str
    env: dict[str, str]
    key: str


@pytest.fixture()
def served(tmp_path: Path, service_bundle: Path) -> Iterator[Served]:
    """`skinscan serve` with a clinic (its API key) and a web user."""
    env = embedded_env(tmp_path / "data", service_bundle)
    key = cli(env, "clinics", "create", "First Week Clinic").stdout.strip().splitlines()[-1].removeprefix("API key: ")
    cli(env, "users", "create", "First Week Clinic", EMAIL, stdin=PASSWORD + "\n")
    server = Serve(env, tmp_path / "console.txt")
    try:
        yield Served(server.url, env, key)
    finally:
        server.stop()


def sign_in(driver: Any, base: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(base + "/signin")
    driver.find_element(By.ID, "email").send_keys(EMAIL)
    driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
    wait_for(lambda: driver.current_url.endswith("/jobs"), 30, "sign-in did not reach the jobs page")


def test_the_upload_form_starts_each_batch_clean(served, browser, isic2017_dir, tmp_path):  # noqa: F811
    """After a batch is sent (its result shown on the page: a file was refused), the form keeps neither the
    batch's name nor its labels file nor its files, so the next batch cannot inherit them."""
    from selenium.webdriver.common.by import By

    driver = browser
    served = served.url
    sign_in(driver, served)
    images = sorted((isic2017_dir / "ISIC-2017_Test_v2_Data").glob("ISIC_*.jpg"))[:2]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,melanoma,seborrheic_keratosis\n" + "".join(f"{p.stem},0,0\n" for p in images))
    driver.get(served + "/jobs/new")
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in [*images, notes]))
    driver.find_element(By.ID, "job-name").send_keys("Monday clinic")
    driver.find_element(By.ID, "labels").send_keys(str(labels))
    driver.find_element(By.ID, "upload-button").click()
    link = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload-result a.button"), 120,
                    "the upload's result did not appear")
    assert re.search(r"/jobs/[0-9a-f]{32}", link[0].get_attribute("href"))
    assert "Job created: 2 images" in driver.find_element(By.ID, "upload-result").text
    assert driver.find_element(By.ID, "job-name").get_attribute("value") == ""
    assert driver.find_element(By.ID, "labels").get_attribute("value") == ""
    assert driver.find_element(By.ID, "files").get_attribute("value") == ""
    assert console_problems(driver) == []


def _visible_in_window(driver: Any, element_id: str) -> dict[str, float]:
    return driver.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: window.innerHeight,"
        " width: window.innerWidth};", element_id)


def test_the_review_screen_fits_1400x1000_and_the_table_shows_review_state(served, browser, isic2017_dir):  # noqa: F811
    """At 1400x1000 an image page shows the image, its heat map and the whole decision form without scrolling; after
    a review with a note, the results table shows the review in its Review column, the "not reviewed yet" filter
    leaves the image out and "reviewed" keeps only it, and the CSV and JSON exports carry the note."""
    import requests
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    folder = isic2017_dir / "ISIC-2017_Test_v2_Data"
    images = sorted(folder.glob("ISIC_*.jpg"))[:12]
    out = cli({**served.env, "SKINSCAN_API_KEY": served.key}, "submit", *map(str, images), "--url", served.url,
              "--no-progress", "--out", str(Path(served.env["SKINSCAN_DATA_DIR"]) / "results.csv"))
    job_id = re.search(r"^Job ([0-9a-f]+)", out.stdout, re.M).group(1)  # type: ignore[union-attr]
    rows = requests.get(f"{served.url}/api/v1/jobs/{job_id}/results", timeout=30,
                        headers={"Authorization": f"Bearer {served.key}"}).json()["results"]
    flagged = [r for r in rows if r["flagged"]]
    assert flagged, "the shipped model flagged none of the 12 images"
    image_id = max(flagged, key=lambda r: r["malignancy_score"])["image_id"]

    driver = browser
    driver.set_window_size(1400, 1000)
    sign_in(driver, served.url)
    driver.get(f"{served.url}/images/{image_id}")
    wait_for(lambda: driver.find_element(By.ID, "heatmap-figure").get_attribute("data-state") == "ready", 120,
             "the heat map was not computed")
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / "first-week-review-1400x1000.png"))
    heat = "heatmap-canvas" if driver.find_elements(By.ID, "heatmap-canvas") else "heatmap-image"
    for element in ("review-save", "review-note", "decision-agree", heat):
        box = _visible_in_window(driver, element)
        assert 0 <= box["top"] and box["bottom"] <= box["height"] and box["right"] <= box["width"], (element, box)
    lesion = driver.find_element(By.CSS_SELECTOR, "img.lesion")
    assert lesion.rect["y"] + lesion.rect["height"] <= driver.execute_script("return window.innerHeight")

    driver.find_element(By.ID, "decision-agree").click()
    Select(driver.find_element(By.ID, "review-diagnosis")).select_by_value("mel")
    driver.find_element(By.ID, "review-note").send_keys("Refer within two weeks; asymmetric")
    driver.find_element(By.ID, "review-save").click()
    wait_for(lambda: image_id not in driver.current_url or driver.find_elements(By.CSS_SELECTOR, ".flashes"), 30,
             "the review was not saved")

    def table_ids(**args: str) -> list[str]:
        query = "&".join(f"{k}={v}" for k, v in {"per_page": "100", **args}.items())
        driver.get(f"{served.url}/jobs/{job_id}?{query}")
        found = driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr[data-image-id]")
        return [r.get_attribute("data-image-id") for r in found]

    everything = table_ids()
    row = driver.find_element(By.CSS_SELECTOR, f"#results-table tr[data-image-id='{image_id}']")
    review_cell = row.find_element(By.CSS_SELECTOR, "[data-role=review]").text
    assert "Agreed" in review_cell and "Refer within two weeks" in review_cell
    others = [r for r in driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr[data-image-id]")
              if r.get_attribute("data-image-id") != image_id]
    assert all("Not reviewed" in r.find_element(By.CSS_SELECTOR, "[data-role=review]").text for r in others)
    assert image_id not in table_ids(reviewed="no") and len(table_ids(reviewed="no")) == len(everything) - 1
    assert table_ids(reviewed="yes") == [image_id]
    driver.get(f"{served.url}/jobs/{job_id}")
    Select(driver.find_element(By.ID, "filter-reviewed")).select_by_value("no")
    wait_for(lambda: "reviewed=no" in driver.current_url, 30, "the review filter did not apply")
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / "first-week-unreviewed-filter.png"))
    assert console_problems(driver) == []

    web = requests.Session()
    for cookie in driver.get_cookies():
        web.cookies.set(cookie["name"], cookie["value"])
    exported = list(csv.DictReader(io.StringIO(web.get(f"{served.url}/jobs/{job_id}/results.csv", timeout=30).text)))
    noted = {r["image_id"]: r for r in exported}[image_id]
    assert noted["review_note"] == "Refer within two weeks; asymmetric" and noted["review_decision"] == "agree"
    as_json = json.loads(web.get(f"{served.url}/jobs/{job_id}/results.json", timeout=30).text)
    items = as_json["results"] if isinstance(as_json, dict) else as_json
    assert {r["image_id"]: r for r in items}[image_id]["review_note"] == "Refer within two weeks; asymmetric"
