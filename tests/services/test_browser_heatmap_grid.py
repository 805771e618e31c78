"""Heat maps drawn by the page from the Grad-CAM grid kept with each prediction (a bundle whose ONNX model outputs
its feature map), in headless Chromium against `skinscan serve`: over the whole image in squash mode, over the
outlined centre square in crop mode, and no heat-map task on page view."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from embedded import Serve, cli, embedded_env
from test_browser import SHOTS, browser, console_problems, wait_for  # noqa: F401 - browser is a fixture by name

pytestmark = [pytest.mark.browser, pytest.mark.slow]
EMAIL, PASSWORD = "reviewer@heatmap-grid.example", "heatmap-grid-password"

# The canvas against the image alone: mean absolute difference of the pixels inside and outside the region the
# page says it drew on (in image pixels), measured away from the region's edge and outline.
_DIFFERENCE = """
const canvas = document.getElementById('heatmap-canvas');
const done = arguments[arguments.length - 1];
const picture = new Image();
picture.onload = () => {
  const plain = document.createElement('canvas');
  plain.width = canvas.width; plain.height = canvas.height;
  const p = plain.getContext('2d');
  p.drawImage(picture, 0, 0, plain.width, plain.height);
  const a = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const b = p.getImageData(0, 0, plain.width, plain.height).data;
  const scale = canvas.width / picture.naturalWidth;
  const [x, y, w, h] = canvas.getAttribute('data-region').split(',').map(v => parseFloat(v) * scale);
  let inside = 0, nIn = 0, outside = 0, nOut = 0;
  for (let j = 0; j < canvas.height; j++) for (let i = 0; i < canvas.width; i++) {
    const k = (j * canvas.width + i) * 4;
    const diff = (Math.abs(a[k] - b[k]) + Math.abs(a[k + 1] - b[k + 1]) + Math.abs(a[k + 2] - b[k + 2])) / 3;
    if (i > x + 8 && i < x + w - 8 && j > y + 8 && j < y + h - 8) { inside += diff; nIn++; }
    else if (i < x - 2 || i > x + w + 2 || j < y - 2 || j > y + h + 2) { outside += diff; nOut++; }
  }
  done({inside: inside / Math.max(1, nIn), outside: nOut ? outside / nOut : null,
        natural: [picture.naturalWidth, picture.naturalHeight]});
};
picture.src = document.getElementById('heatmap-figure').getAttribute('data-src');
"""


@pytest.fixture(scope="module", params=["squash", "crop"])
def grid_bundle(request: pytest.FixtureRequest, service_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service model re-saved by save_bundle (feature-map output and head), in the given resize mode."""
    from skinscan.model.bundle import load_bundle
    from training.export import save_bundle

    source = load_bundle(service_bundle)
    meta = {k: v for k, v in source.meta.items() if k not in ("checksums", "heatmap")}
    meta.update(resize_mode=request.param, version=f"{source.version}-grid-{request.param}")
    out = tmp_path_factory.mktemp("grid") / request.param
    bundle = save_bundle(source.torch_model(), out, meta)
    assert bundle.has_heatmap_output, "the service model's head is not a global pool + linear layer"
    return out


def test_the_page_draws_the_kept_grid_on_the_image(grid_bundle, browser, ham_dir, tmp_path,  # noqa: F811
                                                   pick_ham: Callable[..., list[dict[str, str]]]):
    from selenium.webdriver.common.by import By

    from skinscan.model.bundle import load_bundle

    bundle = load_bundle(grid_bundle)
    env = embedded_env(tmp_path / "data", grid_bundle)
    key = cli(env, "clinics", "create", "Grid Clinic").stdout.strip().splitlines()[-1].removeprefix("API key: ")
    cli(env, "users", "create", "Grid Clinic", EMAIL, stdin=PASSWORD + "\n")
    server = Serve(env, tmp_path / "console.txt")
    try:
        images = [ham_dir / "images" / f"{r['image_id']}.jpg" for r in pick_ham(3, offset=40)]
        out = cli({**env, "SKINSCAN_API_KEY": key}, "submit", *map(str, images), "--url", server.url,
                  "--no-progress", "--out", str(tmp_path / "results.csv"))
        job_id = re.search(r"^Job ([0-9a-f]+)", out.stdout, re.M).group(1)  # type: ignore[union-attr]
        rows = requests.get(f"{server.url}/api/v1/jobs/{job_id}/results", timeout=30,
                            headers={"Authorization": f"Bearer {key}"}).json()["results"]
        image_id = rows[0]["image_id"]

        driver = browser
        driver.set_window_size(1400, 1000)
        driver.get(server.url + "/signin")
        driver.find_element(By.ID, "email").send_keys(EMAIL)
        driver.find_element(By.ID, "password").send_keys(PASSWORD + "\n")
        wait_for(lambda: driver.current_url.endswith("/jobs"), 30, "sign-in did not reach the jobs page")
        driver.get(f"{server.url}/images/{image_id}")
        wait_for(lambda: driver.find_element(By.ID, "heatmap-figure").get_attribute("data-state") == "ready", 30,
                 "the page did not draw the heat map")
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / f"heatmap-grid-{bundle.resize_mode}-1400x1000.png"))
        assert not driver.find_elements(By.ID, "heatmap-image")  # no PNG from a worker
        measured = driver.execute_async_script(_DIFFERENCE)
        width, height = measured["natural"]
        assert width * 3 == height * 4  # HAM10000: 4:3
        drawn = driver.find_element(By.ID, "heatmap-canvas").get_attribute("data-region")
        region = [float(v) for v in drawn.split(",")]
        if bundle.resize_mode == "squash":
            assert region == [0.0, 0.0, width, height]
            assert measured["outside"] is None
        else:
            side = height * bundle.input_size / bundle.resize_size
            assert region == pytest.approx([(width - side) / 2, (height - side) / 2, side, side], abs=0.05)
            assert measured["outside"] == 0  # the image as it is outside the crop
        assert measured["inside"] > 10  # the overlay is drawn over the network's input
        assert console_problems(driver) == []

        # The grid is kept with the prediction (5 x 5 at 160 px) and served as JSON; no heat-map task ran.
        body = driver.execute_async_script(
            "fetch(arguments[0], {headers: {Accept: 'application/json'}}).then(r => r.json())"
            ".then(arguments[arguments.length - 1]);", f"{server.url}/images/{image_id}/heatmap")
        side_cells = bundle.input_size // 32
        assert body["state"] == "grid" and len(body["grid"]) == side_cells
        assert all(len(row) == side_cells and all(0 <= v <= 1 for v in row) for row in body["grid"])
        assert max(max(row) for row in body["grid"]) > 0.99
        assert not [p for p in (tmp_path / "data").rglob("*") if "gradcam" in str(p)]
    finally:
        server.stop()
