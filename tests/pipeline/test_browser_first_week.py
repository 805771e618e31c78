"""The pages in headless Chromium against `skinscan serve` (the shipped model): the upload form starts each batch
clean, and the review screen fits a 1400x1000 window."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from embedded import Serve, cli, embedded_env
from test_browser import browser, console_problems, wait_for  # noqa: F401 - browser is a fixture used by name

pytestmark = [pytest.mark.browser, pytest.mark.slow]
EMAIL, PASSWORD = "reviewer@first-week.example", "first-week-password"


@pytest.fixture()
def served(tmp_path: Path, service_bundle: Path) -> Iterator[str]:
    """`skinscan serve` with a clinic and a web user; yields its address."""
    env = embedded_env(tmp_path / "data", service_bundle)
    cli(env, "clinics", "create", "First Week Clinic")
    cli(env, "users", "create", "First Week Clinic", EMAIL, stdin=PASSWORD + "\n")
    server = Serve(env, tmp_path / "console.txt")
    try:
        yield server.url
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
